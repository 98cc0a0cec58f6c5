"""The graph console: a page at /console (static assets), its JSON API and the in-memory
recorder of recent requests and routing decisions it shows."""
