"""Passages of real text installed on (or fetched by apt to) this machine, with known-item queries derived from the
text's own structure: man pages (query: the NAME line, relevant: the page's passages) and WordNet 3.0 glosses
(query: a usage example, relevant: the synset's passage)."""
from __future__ import annotations

import gzip
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Passages:
    """Texts and known-item queries: ``relevant[i]`` lists the passage ids relevant to ``queries[i]``."""
    texts: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    relevant: list[list[int]] = field(default_factory=list)

    def extend(self, other: "Passages") -> None:
        base = len(self.texts)
        self.texts += other.texts
        self.queries += other.queries
        self.relevant += [[base + r for r in rel] for rel in other.relevant]


_ESCAPES = re.compile(r"\\f[BIRP1-4]|\\f\(..|\\f\[[^]]*\]|\\\(..|\\\[[^]]*\]|\\[-&e|^%]")
_SPACES = re.compile(r"\s+")


def man_page(path: Path, max_query_words: int = 24) -> tuple[str, str] | None:
    """(NAME description, body without the NAME section) of a gzipped man page, troff escapes and requests
    removed (the description cut at ``max_query_words`` words); None when it cannot be read or has none."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    except (OSError, EOFError):
        return None
    body, name, in_name = [], [], False
    for line in text.splitlines():
        if line.startswith(".SH") or line.startswith(".Sh"):
            in_name = line.split(None, 1)[-1].strip().strip('"').upper() == "NAME"
            continue
        if line.startswith(".\\\"") or line.startswith("'\\\""):
            continue
        clean = _ESCAPES.sub(" ", (line.lstrip(".") if line.startswith(".") else line).replace("\\-", "-"))
        (name if in_name else body).append(clean)
    joined = " ".join(name)
    desc = joined.split(" - ", 1)[-1] if " - " in joined else joined
    desc = " ".join(desc.split()[:max_query_words])
    return (desc, _SPACES.sub(" ", " ".join(body)).strip()) if desc else None


def man_page_passages(root: str | Path = "/usr/share/man", words: int = 50, max_per_page: int = 8,
                      min_words: int = 20) -> Passages:
    """The English man pages under ``root`` cut into passages of ``words`` words (at most ``max_per_page`` per page,
    the last one kept if it has ``min_words``). One query per distinct NAME description, relevant: every passage
    of the pages that carry it. Pages sorted by path, so the result is reproducible on one machine."""
    out, by_desc = Passages(), {}
    for path in sorted(Path(root).glob("man[1-9]*/*.gz")):
        page = man_page(path)
        if page is None:
            continue
        desc, body = page
        tokens = body.split()
        ids = []
        for start in range(0, min(len(tokens), words * max_per_page), words):
            chunk = tokens[start:start + words]
            if len(chunk) < min_words and start > 0:
                break
            if len(chunk) >= min(min_words, len(tokens)) and chunk:
                ids.append(len(out.texts))
                out.texts.append(" ".join(chunk))
        if ids:
            by_desc.setdefault(desc, []).extend(ids)
    out.queries = list(by_desc)
    out.relevant = list(by_desc.values())
    return out


def debian_package(package: str, cache: Path) -> Path:
    """The files of a Debian package, fetched with ``apt-get download`` and extracted to ``cache / package`` once
    (no installation, no root needed beyond apt's own); raises RuntimeError saying how to provide them."""
    root = cache / package
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", package], cwd=cache, check=True, capture_output=True)
        deb = sorted(cache.glob(f"{package}_*.deb"))[-1]
        tmp = cache / f"{package}.partial"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
        tmp.rename(root)
    except (OSError, IndexError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"could not fetch {package} with `apt-get download {package}` + `dpkg-deb -x` ({exc}); "
                           f"run `apt-get update` first or extract the package to {root}") from exc
    return root


def fetch_wordnet(cache: Path) -> Path:
    """The WordNet 3.0 database folder from Debian's ``wordnet-base``."""
    return debian_package("wordnet-base", cache) / "usr/share/wordnet"


_QUOTED = re.compile(r'"([^"]+)"')
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def wordnet_passages(root: str | Path, min_query_words: int = 4) -> Passages:
    """One passage per WordNet synset: its words and definition (usage examples removed). Queries: each usage
    example of at least ``min_query_words`` words; relevant: its synset. The example contains the word, which
    usually has several senses (synsets) in the collection, so the query has to pick the right one from context: a
    sense-disambiguation known-item task. (Masking the word instead makes a cloze test that splade-tiny cannot do:
    22 of 400 such queries found their synset in the top 100.)"""
    out = Passages()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (Path(root) / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            count = int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
            definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
            pid = len(out.texts)
            out.texts.append(f"{', '.join(lemmas)}: {definition}")
            for example in _QUOTED.findall(gloss):
                example = _SPACES.sub(" ", example).strip()
                if len(_WORD.findall(example)) >= min_query_words:
                    out.queries.append(example)
                    out.relevant.append([pid])
    return out
