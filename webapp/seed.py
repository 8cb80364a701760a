"""Demo data: organisations, users and rows whose text is hard to export correctly."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import insert, select, text

from jobs.models import Order, Organisation, Transaction, User, db

DEV_PASSWORD = "exportdesk"
ORGANISATIONS = [("Acme", "acme"), ("Globex", "globex"), ("exportdesk", "exportdesk")]
USERS = [
    ("alice@acme.test", "acme", "user"),
    ("bob@globex.test", "globex", "user"),
    ("admin@exportdesk.test", "exportdesk", "admin"),
    ("viewer@exportdesk.test", "exportdesk", "viewer"),
]
# Text that breaks naive exporters: separators, quotes, line breaks, non-ASCII, formulas.
TRICKY_TEXT = [
    "Invoice 1042, March",
    'Said "thanks" twice',
    "Two\nlines",
    "Carriage\r\nreturn",
    "Café Zürich — naïve ✓",
    "東京の注文",
    "=HYPERLINK(\"http://evil.test\",\"click\")",
    "+1 555 0100",
    "-discount applied",
    "@SUM(A1:A9)",
    "\tindented",
    "plain description",
]
CUSTOMERS = ["Ada Lovelace", "Grace Hopper", "Renée Descartes", "O'Brien, Pat", '"Quoted" Ltd']
CURRENCIES = ["EUR", "USD", "GBP", "JPY"]
TX_STATUSES = ["pending", "settled", "refunded", "failed"]
ORDER_STATUSES = ["open", "shipped", "delivered", "cancelled"]
START = datetime(2026, 1, 1)


def has_data() -> bool:
    return db.session.scalar(select(User.id).limit(1)) is not None


def seed(rows: int, chunk: int = 10_000) -> list[tuple[str, str]]:
    """Create the demo organisations and users, then `rows` transactions and rows//4 orders."""
    orgs = {}
    for name, slug in ORGANISATIONS:
        org = db.session.scalar(select(Organisation).where(Organisation.slug == slug))
        orgs[slug] = org or Organisation(name=name, slug=slug)
        db.session.add(orgs[slug])
    for email, slug, role in USERS:
        if db.session.scalar(select(User).where(User.email == email)) is None:
            user = User(email=email, organisation=orgs[slug], role=role)
            user.set_password(DEV_PASSWORD)
            db.session.add(user)
    db.session.commit()
    tenants = [orgs["acme"].id, orgs["globex"].id]
    rng = random.Random(42)

    def when() -> datetime:
        return START + timedelta(seconds=rng.randrange(0, 330 * 86400))

    def amount() -> Decimal:
        return Decimal(rng.randrange(-50_000, 500_000)) / 100

    for table, count, make in (
        (Transaction.__table__, rows, lambda: {
            "org_id": rng.choice(tenants), "created_at": when(), "amount": amount(),
            "currency": rng.choice(CURRENCIES), "status": rng.choice(TX_STATUSES),
            "customer_email": f"customer{rng.randrange(10_000)}@example.test",
            "description": rng.choice(TRICKY_TEXT),
        }),
        (Order.__table__, rows // 4, lambda: {
            "org_id": rng.choice(tenants), "created_at": when(),
            "customer": rng.choice(CUSTOMERS), "total": abs(amount()),
            "status": rng.choice(ORDER_STATUSES),
            "items": "; ".join(rng.choice(TRICKY_TEXT) for _ in range(rng.randrange(1, 4))),
        }),
    ):
        for offset in range(0, count, chunk):
            batch = [make() for _ in range(min(chunk, count - offset))]
            db.session.execute(insert(table), batch)
            db.session.commit()
        if db.engine.dialect.name == "postgresql":  # statistics now, not at autovacuum's pace:
            db.session.execute(text(f"ANALYZE {table.name}"))  # else pages plan a sort
            db.session.commit()
    return [(email, DEV_PASSWORD) for email, _, _ in USERS]
