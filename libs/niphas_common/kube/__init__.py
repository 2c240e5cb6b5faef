"""Kubernetes access, in one place for every service: which cluster (`config`), the API as
raw JSON objects with its errors translated once (`client`), and list + watch of a collection
(`watch`). Nothing else in the tree imports kubernetes_asyncio (an import-linter contract)."""
