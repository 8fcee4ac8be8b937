"""The bottom layer every app may import: errors, the neutral generation request, Redis, columns. It imports no
other app of ours (held by an import-linter contract in `make lint`)."""
