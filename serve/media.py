"""Image URLs of chat messages -> image bytes, within the server's limits.

    data:image/...;base64,...   always accepted (decoded, at most --max-image-mb)
    http:// https://            only with --allow-remote-images: fetched with a timeout
                                (--image-fetch-timeout) and a byte limit; redirects only to http(s)
    file://PATH or /PATH        only under --allowed-local-media-path DIR: a regular file inside DIR
                                (symlinks resolved first), at most --max-image-mb

Every refusal is an APIError: 400 for a URL the server will not or cannot read, 413 when too large.
"""

from __future__ import annotations

import base64
import binascii
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .protocol import APIError


@dataclass(frozen=True)
class ImageFetcher:
    max_bytes: int
    allow_remote: bool = False
    local_root: Path | None = None
    timeout_s: float = 10.0

    def fetch(self, url: str, kind: str = "image") -> bytes:
        """A media URL -> its bytes; `kind` ("image" or "video") is what a data: URL must hold."""
        scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url[:12] else ""
        if scheme == "data":
            return self._data(url, kind)
        if scheme in ("http", "https"):
            return self._remote(url)
        if scheme in ("file", ""):
            return self._local(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme else url)
        raise _bad(f"image_url scheme {scheme!r} is not supported; use a data:image/...;base64, URL"
                   f"{', http(s)' if self.allow_remote else ''}{', or a local path' if self.local_root else ''}")

    def _data(self, url: str, kind: str = "image") -> bytes:
        header, _, payload = url.partition(",")
        media_type = header[5:].split(";")[0].lower()
        if not media_type.startswith(f"{kind}/") or not header.endswith(";base64"):
            raise _bad(f"{kind}_url must be a base64 data URL of {'an image' if kind == 'image' else 'a video'} "
                       f"(data:{kind}/...;base64,...), got {header[:60]!r}", f"invalid_{kind}_url")
        self._check_size(len(payload) * 3 // 4)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"{kind}_url's base64 payload does not decode ({e})", f"invalid_{kind}_url") from None

    def _remote(self, url: str) -> bytes:
        if not self.allow_remote:
            raise _bad("image_url must be a data: URL (data:image/png;base64,...); http(s) URLs are refused unless "
                       "the server runs with --allow-remote-images", "image_url_not_allowed")
        opener = urllib.request.build_opener(_HttpOnlyRedirects)
        try:
            with opener.open(url, timeout=self.timeout_s) as response:
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as e:
            raise _bad(f"fetching the image {url[:200]!r} failed: HTTP {e.code} {e.reason}", "image_fetch_failed") from None
        except (urllib.error.URLError, OSError, ValueError) as e:  # includes timeouts
            reason = getattr(e, "reason", e)
            raise _bad(f"fetching the image {url[:200]!r} failed: {reason} (timeout {self.timeout_s:g} s, "
                       "--image-fetch-timeout)", "image_fetch_failed") from None
        self._check_size(len(data))
        return data

    def _local(self, path: str) -> bytes:
        if self.local_root is None:
            raise _bad("image_url must be a data: URL (data:image/png;base64,...); local paths are refused unless "
                       "the server runs with --allowed-local-media-path DIR", "image_url_not_allowed")
        root = self.local_root.resolve()
        target = (root / path).resolve()  # an absolute `path` replaces root; `..` and symlinks are resolved
        if not target.is_relative_to(root):
            raise _bad(f"image path {path!r} is outside the allowed directory {str(root)!r} "
                       "(--allowed-local-media-path)", "image_url_not_allowed")
        try:
            st = target.stat()
        except OSError as e:
            raise _bad(f"image path {path!r} cannot be read: {e.strerror}", "image_fetch_failed") from None
        if not stat.S_ISREG(st.st_mode):
            raise _bad(f"image path {path!r} is not a regular file", "image_fetch_failed")
        self._check_size(st.st_size)
        return target.read_bytes()

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise APIError(413, f"an image is about {size:,} bytes, over this server's limit of {self.max_bytes:,} "
                                "bytes per image (--max-image-mb)", "messages", "image_too_large")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) (never to file: or ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL refused: {newurl[:100]}",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _bad(message: str, code: str | None = None) -> APIError:
    return APIError(400, message, "messages", code)
