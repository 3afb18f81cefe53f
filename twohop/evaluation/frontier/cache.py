"""A response cache on disk: answered requests cost nothing when a run is repeated or resumed.

Keyed by (back end identity, messages, parameters); only answered requests are stored, so a rerun
retries what failed. An append-only JSONL file, flushed and synced per entry: a killed run keeps
every reply it got (a line cut short by the kill is ignored on reading).
"""
import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

from twohop.evaluation.frontier.backends import Reply


def cache_key(identity: dict, messages: list, params: dict) -> str:
    blob = json.dumps({"who": identity, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries, self._lock = {}, threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.entries[entry["key"]] = entry["reply"]

    def get(self, key: str):
        reply = self.entries.get(key)
        return Reply(**reply) if reply is not None else None

    def put(self, key: str, reply: Reply) -> None:
        if reply.error:
            return
        record = asdict(reply)
        with self._lock:
            self.entries[key] = record
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": record}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
