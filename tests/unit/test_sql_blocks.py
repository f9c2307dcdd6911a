"""Named SQL blocks, and the hottest of them bound by position."""

from __future__ import annotations

import sqlite3

from app.stores.journal_connection import INSERT_EVENT, INSERT_MESSAGE, SQL, UPDATE_MESSAGE
from app.stores.sql_blocks import Positional


def test_a_positional_statement_takes_each_named_parameter_in_the_statements_order() -> None:
    statement = Positional.of("UPDATE t SET b = :b, a = :a WHERE id = :id AND c = '12:00' AND d = x::text")
    assert statement.sql == "UPDATE t SET b = ?, a = ? WHERE id = ? AND c = '12:00' AND d = x::text"
    assert statement.pick({"id": 7, "a": 1, "b": 2, "unused": 3}) == (2, 1, 7)


def test_the_journals_positional_statements_write_what_their_named_blocks_write() -> None:
    row = {"id": 1, "queue_id": 2, "content": '"c"', "headers": None, "status": "pending", "delivery_count": 0,
           "created_at": 1.5, "updated_at": 1.5, "available_at": 1.5, "last_error": None,
           "dead_lettered_from": None, "lease_id": None, "lease_expires_at": None, "delivered_at": None}
    event = {"seq": 1, "ts": 1.5, "type": "message.published", "queue": "q", "message_id": 1, "actor": "a",
             "data": "{}"}
    statements = [("insert_message", INSERT_MESSAGE, row), ("update_message", UPDATE_MESSAGE, {**row, "status": "x"}),
                  ("insert_event", INSERT_EVENT, event)]
    tables = []
    for positional in (False, True):
        conn = sqlite3.connect(":memory:")
        conn.executescript(SQL["schema"])
        for name, statement, params in statements:
            if positional:
                conn.executemany(statement.sql, map(statement.pick, [params]))
            else:
                conn.executemany(SQL[name], [params])
        tables.append([conn.execute(f"SELECT * FROM {table}").fetchall() for table in ("messages", "events")])
    assert tables[0] == tables[1] and tables[0][0][0][4] == "x"
