"""Forge webhook dialects, one module per forge family (one endpoint each)."""

from niphas_eval.forges.base import ForgeAdapter
from niphas_eval.forges.gitea import Gitea
from niphas_eval.forges.github import GitHub
from niphas_eval.forges.gitlab import GitLab

ADAPTERS: dict[str, ForgeAdapter] = {a.family: a for a in (GitHub(), Gitea(), GitLab())}
"""By endpoint: /hooks/github, /hooks/gitea (Gitea and Forgejo), /hooks/gitlab."""

__all__ = ["ADAPTERS", "ForgeAdapter", "GitHub", "GitLab", "Gitea"]
