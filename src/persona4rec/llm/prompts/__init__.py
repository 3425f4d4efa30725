"""Versioned prompt sets, shipped as package resources.

A prompt set is a folder ``v<N>/`` holding ``domains.json`` (per domain: nouns and
the aspect fields with their descriptions) and one ``<stage>.system.txt`` /
``<stage>.user.txt`` pair per stage, written with ``string.Template`` placeholders
(``${name}``) so that literal JSON braces need no escaping. Domains are
configuration: adding one means adding an entry to ``domains.json``, not code.

A prompt set is never edited in place once released: change the wording in a new
folder and bump :data:`DEFAULT_PROMPT_VERSION`. The version is part of every cache
key and every output record, and :attr:`PromptSet.fingerprint` (a hash of the
files) is recorded too, so an accidental in-place edit is still visible.

Cache keys use :meth:`PromptSet.stage_fingerprint` (the stage's two templates and the
domain's configuration) rather than the version, so a new version invalidates the
cached answers of the stages whose prompts changed and of no other stage.

Versions: ``v1`` (the first prompts); ``v2`` (the paper's inputs: the persona prompt
sees the item description and, per review, its title, its text and its aspects, and
asks for 3-5 word names; the judge sees the user's own review aspects for each history
item). ``v2`` keeps ``v1``'s aspects and summary prompts word for word.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

DEFAULT_PROMPT_VERSION = "v2"
STAGES = ("aspects", "summary", "personas", "selection")


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one version for one domain."""

    version: str
    domain: str
    config: dict[str, Any]
    templates: dict[str, tuple[string.Template, string.Template]]
    fingerprint: str
    stage_fingerprints: dict[str, str] = field(default_factory=dict)

    def stage_fingerprint(self, stage: str) -> str:
        """Hash of what shapes one stage's prompts: its templates and the domain configuration."""
        return self.stage_fingerprints[stage]

    @property
    def tag(self) -> str:
        """``<version>/<domain>``: what records and cache keys carry."""
        return f"{self.version}/{self.domain}"

    def render(self, stage: str, **values: Any) -> list[dict[str, str]]:
        """Chat messages (system + user) of ``stage`` with the domain's nouns and ``values`` filled in."""
        system, user = self.templates[stage]
        nouns = {k: v for k, v in self.config.items() if isinstance(v, str)}
        nouns["item_noun_title"] = nouns["item_noun"].capitalize()
        fill = {**nouns, **{k: _text(v) for k, v in values.items()}}
        try:
            return [
                {"role": "system", "content": system.substitute(fill).strip()},
                {"role": "user", "content": user.substitute(fill).strip()},
            ]
        except KeyError as exc:
            raise ValueError(f"prompt {self.tag}/{stage} needs a value for {exc.args[0]!r}") from None


def _text(value: Any) -> str:
    if value is None:
        return "(none)"
    return str(value).strip() or "(none)"


def available_domains(version: str = DEFAULT_PROMPT_VERSION) -> list[str]:
    """Domain names defined by prompt set ``version``."""
    return sorted(_load_domains(version))


@lru_cache(maxsize=None)
def _load_domains(version: str) -> dict[str, Any]:
    folder = resources.files(__name__).joinpath(version)
    if not folder.is_dir():
        raise ValueError(f"unknown prompt version {version!r}; shipped versions: {_shipped_versions()}")
    return json.loads(folder.joinpath("domains.json").read_text(encoding="utf-8"))


def _shipped_versions() -> list[str]:
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.is_dir() and p.name.startswith("v"))


@lru_cache(maxsize=None)
def load_prompt_set(domain: str, version: str = DEFAULT_PROMPT_VERSION) -> PromptSet:
    """Load the prompts of ``version`` for ``domain`` (raises ValueError naming the valid choices)."""
    domains = _load_domains(version)
    if domain not in domains:
        raise ValueError(f"unknown domain {domain!r} in prompts {version}; choose one of {sorted(domains)}")
    folder = resources.files(__name__).joinpath(version)
    digest = hashlib.sha256(folder.joinpath("domains.json").read_bytes())
    templates = {}
    stage_fingerprints = {}
    domain_config = json.dumps(domains[domain], sort_keys=True).encode()
    for stage in STAGES:
        pair = []
        stage_digest = hashlib.sha256(domain_config)
        for role in ("system", "user"):
            raw = folder.joinpath(f"{stage}.{role}.txt").read_text(encoding="utf-8")
            digest.update(raw.encode())
            stage_digest.update(raw.encode())
            pair.append(string.Template(raw))
        templates[stage] = (pair[0], pair[1])
        stage_fingerprints[stage] = stage_digest.hexdigest()[:12]
    return PromptSet(version, domain, domains[domain], templates, digest.hexdigest()[:12], stage_fingerprints)
