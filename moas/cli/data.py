"""The data commands: ``moas make-data``, ``prepare``, ``download``, ``caption`` and ``eval``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moas.cli.generate import load_pipeline
from moas.errors import DataError, MoasError

log = logging.getLogger("moas")


def cmd_make_data(a: argparse.Namespace) -> int:
    from moas.data.synthetic import generate_demo_dataset

    if a.n_images < 1:
        raise MoasError("--n_images must be at least 1.")
    if a.sequences < 0:
        raise MoasError("--sequences must be 0 or more.")
    if not 0.0 <= a.sequence_tag_drop <= 1.0:
        raise MoasError("--sequence_tag_drop must be between 0 and 1.")
    manifest = generate_demo_dataset(
        a.out,
        n_images=a.n_images,
        size=a.size,
        seed=a.seed,
        sequences=a.sequences,
        sequence_tag_drop=a.sequence_tag_drop,
        scene=a.scene,
    )
    n_seq = sum(len(s["panels"]) for s in manifest.get("sequences", []))
    print(
        f"wrote {manifest['n_images']} images"
        + (f" and {a.sequences} sequences ({n_seq} panels)" if a.sequences else "")
        + f" to {Path(a.out) / 'train'} and {Path(a.out) / 'manifest.json'}"
    )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from moas.eval.evaluate import run_eval, summary, write_json
    from moas.eval.folder_cli import eval_folder, image_folder
    from moas.eval.folder_eval import summary_text
    from moas.eval.validate import find_demo_manifest

    if a.n < 1:
        raise MoasError("--n must be at least 1.")
    if not Path(a.data_dir).is_dir():
        raise DataError(f"Data folder {a.data_dir} does not exist or is not a folder.")
    pipe = load_pipeline(a.model, a.device)
    progress = not a.quiet and sys.stderr.isatty()  # tqdm redraws need a terminal
    common = {"steps": a.steps, "guidance_scale": a.guidance_scale, "sampler": a.sampler, "seed": a.seed}
    result: dict = {}
    if find_demo_manifest(a.data_dir) is not None:  # the demo's attribute table stays on the demo
        result = run_eval(
            pipe, a.data_dir, n_per_split=a.n, progress=progress, image_dir=a.save_images, **common
        )
        print(summary(result))
    folder = image_folder(a.data_dir)
    result["folder"] = eval_folder(pipe, folder, a.n_folder, progress=progress, **common)
    print(summary_text(result["folder"]))
    out = Path(a.json) if a.json else Path(a.model).with_name("eval.json")
    write_json(result, out)
    print(f"full result: {out}")
    return 0


def cmd_caption(a: argparse.Namespace) -> int:
    from moas.eval.caption import caption_folder, describe

    result = caption_folder(
        a.data_dir, a.seed, a.threshold, progress=not a.quiet and sys.stderr.isatty(), max_tags=a.max_tags
    )
    print(describe(result))
    return 0


def _thresholds(a: argparse.Namespace):
    from moas.data.filters import QualityThresholds

    if a.min_long_edge < 1 or a.min_short_edge < 1:
        raise MoasError("--min_long_edge and --min_short_edge must be at least 1.")
    return QualityThresholds(min_long_edge=a.min_long_edge, min_short_edge=a.min_short_edge)


def cmd_prepare(a: argparse.Namespace) -> int:
    from moas.data.filters import prepare_folder

    report_path = Path(a.report or "logs/prepare_report.json")
    r = prepare_folder(a.data_dir, a.move_rejects, report_path, _thresholds(a), progress=not a.quiet)
    reasons = ", ".join(f"{k} {v}" for k, v in r["by_reason"].items()) or "none"
    moved = f"; rejects moved to {a.move_rejects}" if a.move_rejects else ""
    print(f"{r['kept']} of {r['total']} images pass; rejected: {reasons}{moved}; report: {report_path}")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from moas.data.download import DanbooruDownloader, DownloadSettings

    if a.target < 1 or a.max_pages < 1 or a.retries < 0 or a.timeout <= 0 or a.max_file_mb <= 0:
        raise MoasError(
            "--target and --max_pages must be at least 1, --retries 0 or more, --timeout and --max_file_mb positive."
        )
    settings = DownloadSettings(
        tags=a.tags,
        target=a.target,
        base_url=a.base_url,
        min_score=a.min_score,
        require_anime_keyword=not a.no_anime_check,
        max_pages=a.max_pages,
        timeout=(min(10.0, a.timeout), a.timeout),
        retries=a.retries,
        max_file_bytes=int(a.max_file_mb * 1024 * 1024),
        thresholds=_thresholds(a),
    )
    dl = DanbooruDownloader(a.out, settings)
    report_path = Path(a.report or "logs/download_report.json")
    try:
        rep = dl.run(progress=not a.quiet)
    finally:
        dl.write_report(report_path)
    if rep.skipped_run:
        print(
            f"{a.out} already meets the target of {a.target} images"
            + (f"; trimmed {rep.trimmed}" if rep.trimmed else "")
            + "."
        )
        return 0
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rep.failures.items())) or "none"
    print(
        f"examined {rep.total} posts: {rep.downloaded} downloaded, {rep.present} already present, "
        f"{sum(rep.failures.values())} skipped ({reasons}); report: {report_path}"
    )
    return 0
