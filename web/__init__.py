"""`imagebatch serve`: the read-only web app (app.py), its templates and static files."""
