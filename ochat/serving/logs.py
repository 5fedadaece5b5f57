"""Server logs: one JSON object per line, optionally to a rotating file (`--log-file`)."""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import time

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_app_ids = itertools.count()


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "message": record.getMessage()}
        line.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def app_logger(log_file: str | None, max_bytes: int = 20 * 1024 * 1024, backups: int = 5) -> logging.Logger:
    """A logger for one app under "ochat.serving" (so `ochat serve` can show it on stderr), writing JSON
    lines to `log_file` (rotated at `max_bytes`, keeping `backups` old files) when given."""
    log = logging.getLogger(f"ochat.serving.app{next(_app_ids)}")
    log.setLevel(logging.INFO)
    if log_file:
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups,
                                                       encoding="utf-8")
        handler.setFormatter(JsonLineFormatter())
        log.addHandler(handler)
    return log


def log_to_stderr() -> None:
    """`ochat serve`: show the server's log lines (JSON) on stderr."""
    root = logging.getLogger("ochat.serving")
    if not any(getattr(h, "_ochat_stderr", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLineFormatter())
        handler._ochat_stderr = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)
