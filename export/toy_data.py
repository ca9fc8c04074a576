"""A small built-in multilingual corpus and a toy sentencepiece + fairseq dictionary built on it.

Used by the demo and the tests: a real ``spm.model`` / ``dict.txt`` pair (the model is ~240 KB,
nearly all of it sentencepiece's nmt_nfkc table), trained in well under a second, byte-identical on
every call. The dict.txt deliberately lists the pieces in an order
different from the sentencepiece ids (descending corpus frequency), as real fairseq dictionaries do,
so that code mapping "spm id + 1" instead of looking pieces up in dict.txt gets caught.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

# Language tags appended to the toy dict.txt, for multilingual source / target prefixes.
TOY_LANG_TAGS: tuple[str, ...] = ("__en__", "__de__", "__es__", "__fr__")

# Per language: subjects, verbs, objects, places, and the sentence template. Sentence i of a
# language takes word i mod len(list) from each list; the list lengths 7, 5, 8, 9 are pairwise
# coprime, so the first 100 sentences are 100 different combinations.
_LEXICON: dict[str, tuple[list[str], list[str], list[str], list[str], str]] = {
    "en": (
        ["The cat", "My brother", "The old teacher", "A child", "Our neighbour", "The doctor", "Her friend"],
        ["sees", "likes", "paints", "finds", "wants"],
        [
            "the red apple",
            "a small house",
            "the green river",
            "two black dogs",
            "a long letter",
            "the blue car",
            "some fresh bread",
            "an empty bottle",
        ],
        [
            "in the morning",
            "near the station",
            "every day",
            "after school",
            "at night",
            "in the garden",
            "on Sunday",
            "behind the church",
            "during the summer",
        ],
        "{s} {v} {o} {p}.",
    ),
    "de": (
        ["Die Katze", "Mein Bruder", "Der alte Lehrer", "Ein Kind", "Unser Nachbar", "Die Ärztin", "Ihr Freund"],
        ["sieht", "mag", "malt", "findet", "will"],
        [
            "den roten Apfel",
            "ein kleines Haus",
            "den grünen Fluss",
            "zwei schwarze Hunde",
            "einen langen Brief",
            "das blaue Auto",
            "frisches Brot",
            "eine leere Flasche",
        ],
        [
            "am Morgen",
            "neben dem Bahnhof",
            "jeden Tag",
            "nach der Schule",
            "in der Nacht",
            "im Garten",
            "am Sonntag",
            "hinter der Kirche",
            "während des Sommers",
        ],
        "{s} {v} {p} {o}.",
    ),
    "fr": (
        ["Le chat", "Mon frère", "Le vieux professeur", "Un enfant", "Notre voisin", "Le médecin", "Son amie"],
        ["voit", "aime", "peint", "trouve", "veut"],
        [
            "la pomme rouge",
            "une petite maison",
            "la rivière verte",
            "deux chiens noirs",
            "une longue lettre",
            "la voiture bleue",
            "du pain frais",
            "une bouteille vide",
        ],
        [
            "le matin",
            "près de la gare",
            "chaque jour",
            "après l'école",
            "la nuit",
            "dans le jardin",
            "le dimanche",
            "derrière l'église",
            "pendant l'été",
        ],
        "{s} {v} {o} {p}.",
    ),
    "es": (
        ["El gato", "Mi hermano", "El viejo profesor", "Un niño", "Nuestro vecino", "La médica", "Su amigo"],
        ["ve", "quiere", "pinta", "encuentra", "desea"],
        [
            "la manzana roja",
            "una casa pequeña",
            "el río verde",
            "dos perros negros",
            "una carta larga",
            "el coche azul",
            "pan fresco",
            "una botella vacía",
        ],
        [
            "por la mañana",
            "cerca de la estación",
            "cada día",
            "después de la escuela",
            "por la noche",
            "en el jardín",
            "el domingo",
            "detrás de la iglesia",
            "durante el verano",
        ],
        "¿{s} {v} {o} {p}?",
    ),
}
_SENTENCES_PER_LANGUAGE = 100


def toy_corpus() -> list[str]:
    """The built-in corpus: 400 short sentences, 100 each in de, en, es, fr, in a fixed order."""
    lines = []
    for lang in sorted(_LEXICON):
        *word_lists, template = _LEXICON[lang]
        for i in range(_SENTENCES_PER_LANGUAGE):
            s, v, o, p = (words[i % len(words)] for words in word_lists)
            lines.append(template.format(s=s, v=v, o=o, p=p))
    return lines


def toy_pairs() -> list[tuple[str, str]]:
    """(source, target) pairs of a copy task: every corpus sentence paired with itself."""
    return [(line, line) for line in toy_corpus()]


def _train_spm(corpus: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm  # export-side only; kept out of module import

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is small: take at most vocab_size pieces
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def build_toy_tokenizer(
    workdir: Path, vocab_size: int = 300, lang_tags: tuple[str, ...] = TOY_LANG_TAGS
) -> tuple[Path, Path]:
    """Train a unigram sentencepiece model on ``toy_corpus()`` and write ``workdir/spm.model`` and a
    fairseq ``workdir/dict.txt``; return (spm_path, dict_path).

    dict.txt holds every sentencepiece piece except spm's own ``<unk>``, ``<s>``, ``</s>`` as
    ``piece count`` lines, sorted by descending count of the piece in the encoded corpus (ties by
    piece), followed by ``lang_tags`` (count 0). So fairseq ids (4 + line index) differ from the
    sentencepiece ids. Deterministic: the same bytes on every call.

    ``vocab_size`` is a soft limit: the corpus supports 260 sentencepiece pieces at most, so the
    default 300 gives 260 (dict.txt: 257 pieces + 4 tags, Dictionary: 265 symbols); below 62 (the
    corpus has 59 distinct characters) sentencepiece raises RuntimeError.
    """
    import sentencepiece as spm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = toy_corpus()
    proto = _train_spm(corpus, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=proto)

    counts: Counter[str] = Counter()
    for line in corpus:
        counts.update(sp.encode(line, out_type=str))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    pieces.sort(key=lambda piece: (-counts[piece], piece))
    entries = [(piece, counts[piece]) for piece in pieces]
    entries += [(tag, 0) for tag in lang_tags if tag not in counts]

    spm_path, dict_path = workdir / "spm.model", workdir / "dict.txt"
    spm_path.write_bytes(proto)
    dict_path.write_bytes("".join(f"{piece} {count}\n" for piece, count in entries).encode("utf-8"))
    return spm_path, dict_path
