"""``moas download``: build a training folder from Danbooru's ``posts.json`` API, safely and resumably.

Per post, in order: rating filter, score ≥ 5, the NSFW tag blacklist (:mod:`moas.safety`), the original's
anime-validation keywords, a usable http(s) file URL with an allowed extension, the per-file size cap,
MD5 dedupe against what is already in the folder; then the download (``.part`` file, size cap enforced
while streaming, ``Content-Type`` must be ``image/*``), verification against the API's MD5, the
magic-byte check and safe decode (:func:`moas.data.images.load_image`) and the quality filters
(:mod:`moas.data.filters`). Only then the caption ``.txt`` is written and the ``.part`` renamed to
``<id>_<md5>.<ext>`` — names never come from the server. A killed run leaves at most ``.part`` files,
which the next run deletes before resuming; posts already on disk are counted as present. Every request
has a timeout; 421/429/5xx answers are retried a bounded number of times with exponential backoff,
honouring ``Retry-After`` (capped). Credentials come from ``.env``: ``DANBOORU_LOGIN``,
``DANBOORU_API_KEY`` (sent as HTTP basic auth, never in URLs or logs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util import Retry

from moas.data.filters import QualityThresholds, md5_many, quality_reason
from moas.data.images import ALLOWED_FORMATS, load_image, scan_image_files, sniff_format
from moas.errors import ImageDecodeError, MoasError
from moas.io import atomic_write_bytes
from moas.safety import is_nsfw

log = logging.getLogger(__name__)

ANIME_KEYWORDS = ("anime", "manga", "cartoon", "illustration", "drawing", "art", "character")
EXTENSIONS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
SUFFIX_OF = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}
RETRY_STATUSES = (421, 429, 500, 502, 503, 504)
_MD5 = re.compile(r"^[0-9a-f]{32}$")


class _BoundedRetry(Retry):
    """urllib3 Retry that also honours Retry-After on 421 and never sleeps longer than ``MAX_AFTER``."""

    RETRY_AFTER_STATUS_CODES = frozenset({413, 421, 429, 503})
    MAX_AFTER = 120.0

    def get_retry_after(self, response):  # noqa: ANN001, ANN201 - urllib3 signature
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.MAX_AFTER)


def make_session(retries: int = 5, backoff: float = 1.0, max_retry_after: float = 120.0) -> requests.Session:
    retry_cls = type("BoundedRetry", (_BoundedRetry,), {"MAX_AFTER": float(max_retry_after)})
    retry = retry_cls(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "moas-downloader/0.1"
    return session


@dataclass
class DownloadSettings:
    tags: str = ""  # Danbooru tag query, e.g. "1girl solo"
    target: int = 3500  # images wanted in the folder (the original's target)
    base_url: str = "https://danbooru.donmai.us"  # API root (a mirror, or a local server in tests)
    min_score: int = 5
    ratings: tuple[str, ...] = ("g", "s")  # Danbooru ratings kept: general, sensitive
    require_anime_keyword: bool = True  # the original's anime-validation keywords
    page_size: int = 100  # posts per API page
    max_pages: int = 1000
    timeout: tuple[float, float] = (10.0, 60.0)  # connect, read seconds, on every request
    retries: int = 5
    backoff: float = 1.0  # seconds × 2^n between retries
    max_retry_after: float = 120.0  # cap on a server's Retry-After
    max_file_bytes: int = 50 * 1024 * 1024
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)


@dataclass
class DownloadReport:
    total: int = 0  # posts examined
    downloaded: int = 0
    present: int = 0  # already in the folder (a resumed run)
    failures: Counter = field(default_factory=Counter)  # reason → count
    trimmed: int = 0
    skipped_run: bool = False  # the folder already met the target

    @property
    def successes(self) -> int:
        return self.downloaded + self.present

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "successes": self.successes,
            "downloaded": self.downloaded,
            "present": self.present,
            "failures": sum(self.failures.values()),
            "by_reason": dict(sorted(self.failures.items())),
            "trimmed": self.trimmed,
            "skipped_run": self.skipped_run,
        }


def _is_timeout(exc: BaseException) -> bool:
    """True for timeouts, also when urllib3 reports them wrapped as 'max retries exceeded'."""
    if isinstance(exc, requests.Timeout):
        return True
    inner = exc.args[0] if exc.args else None
    return isinstance(getattr(inner, "reason", None), TimeoutError | urllib3.exceptions.TimeoutError)


def credentials() -> tuple[str, str] | None:
    """``(login, api_key)`` from the environment or ``.env`` in the working directory, if both are set."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    login, key = os.environ.get("DANBOORU_LOGIN", ""), os.environ.get("DANBOORU_API_KEY", "")
    return (login, key) if login and key else None


def caption_from_post(post: dict) -> str:
    """Comma-separated tags (character, copyright, artist, general), underscores as spaces."""
    groups = [post.get(f"tag_string_{g}") for g in ("character", "copyright", "artist", "general")]
    words = " ".join(g for g in groups if g) if any(groups) else str(post.get("tag_string", ""))
    return ", ".join(t.replace("_", " ") for t in words.split())


def _has_anime_keyword(tag_string: str) -> bool:
    words = set(re.split(r"[\s_]+", tag_string.lower()))
    return any(k in words for k in ANIME_KEYWORDS)


class DanbooruDownloader:
    def __init__(
        self, out_dir: str | Path, settings: DownloadSettings, session: requests.Session | None = None
    ):
        self.out = Path(out_dir)
        self.s = settings
        base = urlparse(settings.base_url)
        if base.scheme not in ("http", "https") or not base.netloc:
            raise MoasError(f"--base_url must be an http(s) URL, got {settings.base_url!r}.")
        self.session = session or make_session(settings.retries, settings.backoff, settings.max_retry_after)
        creds = credentials()
        if creds:
            self.session.auth = creds
        self.report = DownloadReport()
        self.known_md5: set[str] = set()

    # ---- folder state -------------------------------------------------------------------------

    def _images(self) -> list[Path]:
        return scan_image_files(self.out, recursive=False)

    def _prepare_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for part in self.out.glob("*.part"):  # left by a killed run
            part.unlink(missing_ok=True)
        self.known_md5 = set(md5_many(self._images()).values())

    def _trim(self, images: list[Path]) -> None:
        """Deterministic trim to the target (sorted reverse, the last ones removed) into ``.trimmed/``."""
        extra = sorted(images, reverse=True)[self.s.target :]
        dest = self.out / ".trimmed"
        dest.mkdir(exist_ok=True)
        for p in extra:
            shutil.move(str(p), dest / p.name)
            cap = p.with_suffix(".txt")
            if cap.is_file():
                shutil.move(str(cap), dest / cap.name)
        self.report.trimmed = len(extra)
        log.info("Trimmed %d images over the target into %s.", len(extra), dest)

    # ---- API ----------------------------------------------------------------------------------

    def _page(self, page: int) -> list[dict]:
        url = urljoin(self.s.base_url.rstrip("/") + "/", "posts.json")
        params = {"tags": self.s.tags, "page": page, "limit": self.s.page_size}
        try:
            r = self.session.get(url, params=params, timeout=self.s.timeout)
        except requests.RequestException as e:
            raise MoasError(f"Danbooru API request for page {page} failed ({type(e).__name__}).") from None
        if r.status_code != 200:
            raise MoasError(f"Danbooru API answered HTTP {r.status_code} for page {page}.")
        try:
            data = r.json()
        except ValueError:
            raise MoasError(f"Danbooru API page {page} is not JSON.") from None
        if not isinstance(data, list):
            raise MoasError(f"Danbooru API page {page} is not a list of posts.")
        return [p for p in data if isinstance(p, dict)]

    # ---- one post -----------------------------------------------------------------------------

    def _filter(self, post: dict) -> str | None:
        s = self.s
        tags = str(post.get("tag_string", ""))
        if str(post.get("rating", "")) not in s.ratings:
            return "rating"
        try:
            if int(post.get("score", 0)) < s.min_score:
                return "low_score"
        except (TypeError, ValueError):
            return "low_score"
        if is_nsfw(tags.replace(" ", ",")):
            return "nsfw_tags"
        if s.require_anime_keyword and not _has_anime_keyword(tags):
            return "not_anime"
        md5 = str(post.get("md5", "")).lower()
        if not _MD5.match(md5) or not isinstance(post.get("id"), int):
            return "bad_metadata"  # no usable md5 / id: a safe file name cannot be derived
        url = post.get("file_url")
        if not url or not isinstance(url, str):
            return "no_file_url"
        if urlparse(urljoin(s.base_url, url)).scheme not in ("http", "https"):
            return "bad_url"
        if str(post.get("file_ext", "")).lower() not in EXTENSIONS:
            return "bad_extension"
        size = post.get("file_size")
        if isinstance(size, int) and size > s.max_file_bytes:
            return "too_large"
        if any(p.suffix.lower().lstrip(".") in EXTENSIONS for p in self.out.glob(f"{post['id']}_{md5}.*")):
            return "present"
        if md5 in self.known_md5:
            return "duplicate"
        return None

    def _fetch(self, url: str, part: Path) -> str | None:
        """Stream ``url`` into ``part``; a failure reason or None."""
        try:
            with self.session.get(url, stream=True, timeout=self.s.timeout) as r:
                if r.status_code != 200:
                    return "http_error"
                ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if not ctype.startswith("image/"):
                    return "bad_content_type"
                length = r.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.s.max_file_bytes:
                    return "too_large"
                written = 0
                with open(part, "wb") as f:
                    for chunk in r.iter_content(1 << 16):
                        written += len(chunk)
                        if written > self.s.max_file_bytes:
                            return "too_large"
                        f.write(chunk)
        except requests.RequestException as e:
            return "timeout" if _is_timeout(e) else "network_error"
        return None

    def _process(self, post: dict) -> str | None:
        reason = self._filter(post)
        if reason:
            return reason
        md5, pid = post["md5"].lower(), post["id"]
        part = self.out / f"{pid}_{md5}.part"
        try:
            reason = self._fetch(urljoin(self.s.base_url, post["file_url"]), part)
            if reason:
                return reason
            with open(part, "rb") as f:
                if hashlib.md5(f.read(), usedforsecurity=False).hexdigest() != md5:
                    return "md5_mismatch"
            fmt = sniff_format(part)
            if fmt not in ALLOWED_FORMATS:
                return "not_an_image"
            try:
                img = load_image(part)
            except ImageDecodeError as e:
                return getattr(e, "reason", "unreadable")
            reason = quality_reason(img, self.s.thresholds)
            if reason:
                return reason
            final = self.out / f"{pid}_{md5}.{SUFFIX_OF[fmt]}"
            atomic_write_bytes(final.with_suffix(".txt"), (caption_from_post(post) + "\n").encode("utf-8"))
            os.replace(part, final)
            self.known_md5.add(md5)
            return None
        finally:
            part.unlink(missing_ok=True)

    # ---- the run ------------------------------------------------------------------------------

    def run(self, progress: bool = True) -> DownloadReport:
        self._prepare_folder()
        images = self._images()
        if len(images) >= self.s.target:
            self.report.skipped_run = True
            if len(images) > self.s.target:
                self._trim(images)
            log.info(
                "%s already holds %d images (target %d); nothing to download.",
                self.out,
                len(images),
                self.s.target,
            )
            return self.report
        have = len(images)
        bar = tqdm(total=self.s.target, initial=have, desc="downloading", unit="img", disable=not progress)
        try:
            for page in range(1, self.s.max_pages + 1):
                posts = self._page(page)
                if not posts:
                    break
                for post in posts:
                    self.report.total += 1
                    reason = self._process(post)
                    if reason == "present":
                        self.report.present += 1
                    elif reason:
                        self.report.failures[reason] += 1
                        log.debug("post %s skipped: %s", post.get("id"), reason)
                    else:
                        self.report.downloaded += 1
                        have += 1
                        bar.update(1)
                    if have >= self.s.target:
                        return self.report
        finally:
            bar.close()
        return self.report

    def write_report(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, json.dumps(self.report.to_dict(), indent=2).encode())
        return p
