"""Build the conditioning brain: register every module on the ConditioningEncoder's DataFlow and wire it.

The graph (``moas inspect --graph`` prints it)::

    text_context ─ pooled, context ─┬─ [compression] ─ pooled'
                                    ├─ emotion        (pooled')               → emotion_embedding, emotion_scores, artistic
                                    ├─ understanding  (pooled', context)      → understanding
                                    ├─ moe            (pooled', context)      → moe_output, expert_states, routing, balance_loss
                                    │    └─ gnn       (expert_states)         → graph_features
                                    │         ├─ dim_bridge (moe_output ⊕ graph_features, 1024→512) → embedding
                                    │         └─ structure  (embedding ← gnn.graph_features)         → structure
                                    │              ├─ line_art, background, camera (embedding, structure)
                                    │              └─ color (embedding, emotion_scores)
                                    └─ story          (pooled', language)     → story
    panel_memory (panel_images, panel_mask) → memory, memory_mask ──► moe (the memory expert only)
                                                                  └► memory_bridge → pooled_delta
    bridge (every module output → one zero-initialised 768-d token each) → extra_context, pooled_delta

Opt-in specialisation (docs/brain.md#specialisation): ``tag_routing`` feeds the MoE the tags, their mask
and their keyword categories (``tags, tag_mask, tag_category``) and adds its ``tag_routing`` output;
``aux_targets > 0`` registers ``aux_targets`` (expert_states, aux_image, aux_mask → aux_target_loss);
``expert_tokens`` registers ``expert_tokens`` (expert_states, graph_features → 15 context tokens).

GNN versions 1–3 are built too (``gnn_v1`` … ``gnn_v3`` attributes of the generator's ``brain_extras``)
so they can be swapped in; ``gnn_version`` picks the one registered as ``gnn``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moas.models.art_experts import (
    AdvancedCameraExpert,
    AdvancedColorExpert,
    AdvancedLineArtExpert,
    BackgroundExpert,
    MultiLanguageStorySystem,
    StructureGenerator,
)
from moas.models.bridge import ContextBridge, DimensionBridge, MemoryBridge
from moas.models.compression import AdvancedCompressionSystem
from moas.models.conditioning import CONTEXT_DIM, ConditioningEncoder
from moas.models.expert_heads import ExpertTargetHeads
from moas.models.expert_tokens import ExpertTokens
from moas.models.gnn import GNN_VERSIONS, EnhancedGNN
from moas.models.moe import EXPERT_NAMES, EnhancedMoE
from moas.models.panel_memory import PanelMemory
from moas.models.understanding import DeepUnderstandingSystem, EmotionalArtisticUnderstanding


@dataclass
class BrainArgs:
    """Plain constructor arguments of the brain (the ``[brain]`` config section minus run-time switches)."""

    expert_dim: int = 512
    router_hidden: list[int] = field(default_factory=lambda: [1024, 512])
    hidden_dim: int = 1536
    expert_heads: int = 8
    cross_expert_heads: int = 16
    gnn_version: int = 4
    gnn_layers: int = 6
    gnn_heads: int = 8
    understanding_layers: int = 6
    understanding_heads: int = 12
    understanding_ff: int = 3072
    understanding_token_dim: int | None = None
    expert_context: bool = True
    dropout: float = 0.1
    load_balance_weight: float = 0.01
    compression: bool = False
    compression_ratio: float = 0.5
    panel_memory: bool = False  # old model files have no panel memory; the config's default is True
    panel_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    panel_max_distance: int = 8
    memory_pooled: bool = False  # MemoryBridge: panel memory → pooled residual (old files: False)
    memory_context: bool = False  # MemoryBridge also → the first context token (old files: False)
    tag_routing: bool = False  # route each tag; experts read their routed tags (old files: False)
    tag_prior: float = 2.0  # the keyword-category logit bias of tag routing
    aux_targets: float = 0.0  # weight of the per-expert image-target loss; 0 = no heads (old files: 0)
    expert_tokens: bool = False  # one context token per expert + the GNN (old files: False)


# Outputs turned into context tokens, with their widths as functions of the arguments.
def _token_widths(a: BrainArgs) -> dict[str, int]:
    d = a.expert_dim
    return {
        "emotion_embedding": CONTEXT_DIM,
        "artistic": CONTEXT_DIM,
        "understanding": CONTEXT_DIM,
        "moe_output": d,
        "expert_states": d,
        "graph_features": d,
        "structure": d,
        "line_art": d,
        "background": d,
        "color": d,
        "camera": d,
        "story": d,
    }


def build_gnn(a: BrainArgs, version: int) -> EnhancedGNN:
    # The nodes are the 14 expert states, so node_embedding reads the expert width (the original: 768).
    return EnhancedGNN(version, a.expert_dim, a.expert_dim, a.gnn_layers, 14, a.gnn_heads, a.dropout)


def install_brain(enc: ConditioningEncoder, a: BrainArgs) -> nn.ModuleDict:
    """Register the brain on ``enc.flow``; returns the GNN versions not registered (kept for ablation).

    The registration order fixes the graph's order and the weights' initialisation order, so it stays."""
    if a.gnn_version not in GNN_VERSIONS:
        raise ValueError(f"gnn_version must be one of {GNN_VERSIONS}")
    _register_understanding(enc, a)
    _register_moe_and_graph(enc, a)
    _register_experts(enc.flow, a)
    if a.panel_memory:  # registered late so a missing text input is reported first; it still runs before moe
        _register_panel_memory(enc.flow, a)
    if a.compression:
        for dst in ("emotion", "understanding", "moe", "story"):
            enc.flow.connect("compression", "pooled_compressed", dst, "pooled")
    widths = _token_widths(a)
    bridge = ContextBridge(widths, CONTEXT_DIM, "moe_output")
    enc.flow.register_module(
        "bridge", bridge, inputs=list(widths), outputs=["extra_context", "extra_context_mask", "pooled_delta"]
    )
    _register_specialisation(enc, a)
    return nn.ModuleDict({f"gnn_v{v}": build_gnn(a, v) for v in GNN_VERSIONS if v != a.gnn_version})


def _register_understanding(enc: ConditioningEncoder, a: BrainArgs) -> None:
    """[compression,] emotion and deep understanding of the (compressed) pooled text and the tokens."""
    flow = enc.flow
    if a.compression:
        flow.register_module(
            "compression",
            AdvancedCompressionSystem(CONTEXT_DIM, a.compression_ratio, a.hidden_dim),
            inputs=["pooled"],
            outputs=["pooled_compressed", "compression_loss"],
        )
        enc.aux_weights["compression.compression_loss"] = 1.0
    flow.register_module(
        "emotion",
        EmotionalArtisticUnderstanding(CONTEXT_DIM, a.hidden_dim, a.dropout),
        inputs=["pooled"],
        outputs=["emotion_embedding", "emotion_scores", "artistic"],
    )
    flow.register_module(
        "understanding",
        DeepUnderstandingSystem(
            CONTEXT_DIM,
            a.hidden_dim,
            a.understanding_layers,
            a.understanding_heads,
            a.understanding_ff,
            4,
            a.dropout,
            a.understanding_token_dim,
        ),
        inputs=["pooled", "context", "context_mask"],
        outputs=["understanding"],
    )


def _register_moe_and_graph(enc: ConditioningEncoder, a: BrainArgs) -> None:
    """The 14-expert MoE (+ its load-balance loss), the GNN over the expert states, the 1024→512 bridge and
    the structure generator that reads the graph."""
    flow, d = enc.flow, a.expert_dim
    ctx = ["context", "context_mask"] if a.expert_context else []
    mem = ["memory", "memory_mask"] if a.panel_memory else []
    tags = ["tags", "tag_mask", "tag_category"] if a.tag_routing else []
    flow.register_module(
        "moe",
        EnhancedMoE(
            CONTEXT_DIM,
            d,
            tuple(a.router_hidden),
            14,
            a.expert_heads,
            a.cross_expert_heads,
            a.dropout,
            CONTEXT_DIM if a.expert_context else None,
            memory=a.panel_memory,
            tag_routing=a.tag_routing,
            tag_prior=a.tag_prior,
        ),
        inputs=["pooled", *ctx, *mem, *tags],
        outputs=["moe_output", "expert_states", "routing", "balance_loss"]
        + (["tag_routing"] if tags else []),
    )
    enc.aux_weights["moe.balance_loss"] = a.load_balance_weight
    flow.register_module(
        "gnn",
        build_gnn(a, a.gnn_version),
        inputs=["expert_states"],
        outputs=["graph_features", "node_features"],
    )
    flow.register_module(
        "dim_bridge",
        DimensionBridge(2 * d, d),
        inputs=["moe_output", "graph_features"],
        outputs=["embedding"],
    )
    flow.register_module(
        "structure", StructureGenerator(d, a.dropout), inputs=["embedding"], outputs=["structure"]
    )
    flow.connect("gnn", "graph_features", "structure", "embedding")


def _register_experts(flow, a: BrainArgs) -> None:
    """The structure-driven art experts, the mood-driven colour expert and the story system."""
    d = a.expert_dim
    for name, cls in (("line_art", AdvancedLineArtExpert), ("background", BackgroundExpert)):
        flow.register_module(name, cls(d, a.dropout), inputs=["embedding", "structure"], outputs=[name])
    flow.register_module(
        "color",
        AdvancedColorExpert(d, 10, a.dropout),
        inputs=["embedding", "emotion_scores"],
        outputs=["color"],
    )
    flow.register_module(
        "camera", AdvancedCameraExpert(d, a.dropout), inputs=["embedding", "structure"], outputs=["camera"]
    )
    flow.register_module(
        "story",
        MultiLanguageStorySystem(CONTEXT_DIM, d, a.dropout),
        inputs=["pooled", "language"],
        outputs=["story"],
    )


def _register_panel_memory(flow, a: BrainArgs) -> None:
    """Previous panels → memory tokens for the memory expert (moas.models.panel_memory), and their direct
    routes into the pooled conditioning and the first context token (MemoryBridge)."""
    flow.register_module(
        "panel_memory",
        PanelMemory(a.expert_dim, tuple(a.panel_channels), CONTEXT_DIM, a.panel_max_distance),
        inputs=["panel_images", "panel_mask"],
        outputs=["memory", "memory_mask"],
    )
    if a.memory_pooled:
        flow.register_module(
            "memory_bridge",
            MemoryBridge(a.expert_dim, CONTEXT_DIM, a.memory_context),
            inputs=["memory", "memory_mask"],
            outputs=["pooled_delta", "context_delta"],
        )


def _register_specialisation(enc: ConditioningEncoder, a: BrainArgs) -> None:
    """The opt-in expert heads on image targets and the per-expert context tokens (registered last, and
    built without random draws, so every other module starts as it would without them)."""
    if a.aux_targets > 0:
        enc.flow.register_module(
            "aux_targets",
            ExpertTargetHeads(EXPERT_NAMES, a.expert_dim),
            inputs=["expert_states", "aux_image", "aux_mask"],
            outputs=["aux_target_loss"],
        )
        enc.aux_weights["aux_targets.aux_target_loss"] = a.aux_targets
    if a.expert_tokens:
        enc.flow.register_module(
            "expert_tokens",
            ExpertTokens(len(EXPERT_NAMES), a.expert_dim, CONTEXT_DIM),
            inputs=["expert_states", "graph_features"],
            outputs=["extra_context", "extra_context_mask"],
        )
