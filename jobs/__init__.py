"""The core of exportdesk: data model, datasets, lanes, dispatch, engine, storage, mail; it never
imports webapp (docs/architecture.md)."""
