"""Conversations saved in sqlite ($LOCALAI_HOME/conversations.db) so that they can be reopened.

Each message is written when it is complete (a stopped answer is saved with what was shown), one
transaction per write, so a killed TUI loses at most the answer that was streaming.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from localai.private import private_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, model TEXT NOT NULL,
    system TEXT NOT NULL DEFAULT '', docs INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, citations TEXT NOT NULL DEFAULT '[]',
    stats TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


@dataclass
class Turn:
    role: str
    content: str
    citations: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    system: str = ""
    docs: bool = False
    turns: list[Turn] = field(default_factory=list)


class Store:
    def __init__(self, path: Path):
        private_file(path)  # conversations are the user's own (sqlite gives its WAL this mode)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def new(self, model: str, system: str = "", docs: bool = False) -> Conversation:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO conversations (title, model, system, docs, created, updated) "
            "VALUES ('', ?, ?, ?, ?, ?)",
            (model, system, int(docs), now, now),
        )
        return Conversation(cur.lastrowid, "", model, system, docs)

    def add(self, conv: Conversation, turn: Turn) -> None:
        if not conv.title and turn.role == "user":
            conv.title = turn.content.strip().splitlines()[0][:60] if turn.content.strip() else ""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, citations, stats, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conv.id, turn.role, turn.content, json.dumps(turn.citations),
                 json.dumps(turn.stats), time.time()),
            )  # fmt: skip
            self.db.execute(
                "UPDATE conversations SET title = ?, model = ?, system = ?, docs = ?, updated = ? "
                "WHERE id = ?",
                (conv.title, conv.model, conv.system, int(conv.docs), time.time(), conv.id),
            )
        conv.turns.append(turn)

    def recent(self, limit: int = 50) -> list[tuple[int, str, float]]:
        """(id, title, updated) of conversations that have messages, newest first."""
        return self.db.execute(
            "SELECT c.id, c.title, c.updated FROM conversations c WHERE EXISTS "
            "(SELECT 1 FROM messages m WHERE m.conversation_id = c.id) "
            "ORDER BY c.updated DESC LIMIT ?",
            (limit,),
        ).fetchall()

    def load(self, conv_id: int) -> Conversation:
        row = self.db.execute(
            "SELECT id, title, model, system, docs FROM conversations WHERE id = ?", (conv_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no conversation {conv_id}")
        conv = Conversation(row[0], row[1], row[2], row[3], bool(row[4]))
        for role, content, cites, stats in self.db.execute(
            "SELECT role, content, citations, stats FROM messages WHERE conversation_id = ? "
            "ORDER BY id",
            (conv_id,),
        ):
            conv.turns.append(Turn(role, content, json.loads(cites), json.loads(stats)))
        return conv

    def close(self) -> None:
        self.db.close()
