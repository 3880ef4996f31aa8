"""The web page and JSON API (`cbir serve`), and the static HTML result page (`cbir search --html`).

`app` needs the web extras (FastAPI, uvicorn, python-multipart); `report` only Pillow."""
