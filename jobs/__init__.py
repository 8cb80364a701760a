"""The Huey side of exportdesk: lanes, tasks, the export engine and the datasets it reads."""
