"""A small bilingual lexicon read at run time from the Ding dictionary (Debian package ``trans-de-en``).

Ding lines read ``German fields :: English fields``; fields are separated by `` | ``, alternatives by
``;``, and annotations sit in ``{}`` (grammar: ``{m}``, ``{pl}``, ``{vt}``), ``[]`` (domain), ``()`` and
``<>``. The first field is the headword; for nouns the second holds the plural, for verbs one field holds
``er/sie <3rd person singular>`` (``er/sie steht auf`` for the separable ``aufstehen``).

:func:`load_lexicon` looks up a fixed list of common words (German headword, English gloss) and takes
from Ding what the grammar needs: noun gender and both plurals, verb 3rd-person-singular forms and
separable prefixes, and confirms adjectives. Words it cannot find are left out (and counted). The
dictionary is GPL-2+ and is never copied into this repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "DING_PATH", "Noun", "Verb", "Adjective", "Lexicon", "load_lexicon", "ding_lines", "ding_sha256", "clean"
]

DING_PATH = Path("/usr/share/trans/de-en")
_MISSING = (
    "the Ding dictionary {path} is missing: install the Debian package trans-de-en "
    "(`sudo apt-get install trans-de-en`, or `make setup`)"
)

# (German singular, English singular); masculine weak nouns (-n declension) are avoided on purpose
NOUNS = [
    ("Hund", "dog"), ("Katze", "cat"), ("Haus", "house"), ("Mann", "man"), ("Frau", "woman"),
    ("Kind", "child"), ("Buch", "book"), ("Apfel", "apple"), ("Tisch", "table"), ("Stuhl", "chair"),
    ("Tür", "door"), ("Fenster", "window"), ("Auto", "car"), ("Baum", "tree"), ("Blume", "flower"),
    ("Vogel", "bird"), ("Pferd", "horse"), ("Kuh", "cow"), ("Schwein", "pig"), ("Fisch", "fish"),
    ("Maus", "mouse"), ("Lehrer", "teacher"), ("Arzt", "doctor"), ("Koch", "cook"), ("Vater", "father"),
    ("Mutter", "mother"), ("Bruder", "brother"), ("Schwester", "sister"), ("Sohn", "son"),
    ("Tochter", "daughter"), ("Freund", "friend"), ("Brief", "letter"), ("Schlüssel", "key"),
    ("Tasche", "bag"), ("Flasche", "bottle"), ("Tasse", "cup"), ("Teller", "plate"), ("Messer", "knife"),
    ("Löffel", "spoon"), ("Gabel", "fork"), ("Ball", "ball"), ("Hut", "hat"), ("Schuh", "shoe"),
    ("Mantel", "coat"), ("Kleid", "dress"), ("Bett", "bed"), ("Lampe", "lamp"), ("Uhr", "clock"),
    ("Bild", "picture"), ("Zimmer", "room"), ("Küche", "kitchen"), ("Garten", "garden"),
    ("Straße", "street"), ("Stadt", "town"), ("Dorf", "village"), ("Schule", "school"),
    ("Kirche", "church"), ("Brücke", "bridge"), ("Berg", "mountain"), ("Fluss", "river"),
    ("Wald", "forest"), ("Feld", "field"), ("Boot", "boat"), ("Schiff", "ship"), ("Zug", "train"),
    ("Fahrrad", "bicycle"), ("Brot", "bread"), ("Kuchen", "cake"), ("Ei", "egg"), ("Suppe", "soup"),
    ("Stein", "stone"), ("Geschenk", "present"), ("Karte", "map"), ("Zeitung", "newspaper"),
    ("Stift", "pen"), ("Heft", "exercise book"), ("Computer", "computer"), ("Telefon", "telephone"),
    ("Koffer", "suitcase"), ("Kiste", "box"), ("Korb", "basket"), ("Topf", "pot"), ("Hemd", "shirt"),
    ("Ring", "ring"), ("Lied", "song"), ("Spiel", "game"), ("Wand", "wall"), ("Dach", "roof"),
    ("Kerze", "candle"), ("Spiegel", "mirror"), ("Schrank", "cupboard"), ("Sofa", "sofa"),
    ("Kissen", "pillow"), ("Teppich", "carpet"), ("Pflanze", "plant"), ("Tier", "animal"),
    ("Ente", "duck"), ("Huhn", "chicken"), ("Ziege", "goat"), ("Schaf", "sheep"), ("Frosch", "frog"),
    ("Biene", "bee"), ("Schlange", "snake"), ("Insel", "island"), ("Markt", "market"),
    ("Bäcker", "baker"), ("Kellner", "waiter"), ("Fahrer", "driver"), ("Sänger", "singer"),
    ("Maler", "painter"), ("Onkel", "uncle"), ("Tante", "aunt"), ("Großvater", "grandfather"),
    ("Großmutter", "grandmother"), ("Mädchen", "girl"), ("Baby", "baby"), ("Gast", "guest"),
    ("König", "king"), ("Königin", "queen"), ("Zahn", "tooth"), ("Fuß", "foot"), ("Hand", "hand"),
    ("Nase", "nose"), ("Stern", "star"), ("Wolke", "cloud"), ("Blatt", "leaf"), ("Kuss", "kiss"),
]
ANIMATE = {
    "dog", "cat", "man", "woman", "child", "bird", "horse", "cow", "pig", "fish", "mouse", "teacher",
    "doctor", "cook", "father", "mother", "brother", "sister", "son", "daughter", "friend", "duck",
    "chicken", "goat", "sheep", "frog", "bee", "snake", "baker", "waiter", "driver", "singer", "painter",
    "uncle", "aunt", "grandfather", "grandmother", "girl", "baby", "guest", "king", "queen", "animal",
}
PEOPLE = ANIMATE - {
    "dog", "cat", "bird", "horse", "cow", "pig", "fish", "mouse", "duck", "chicken", "goat", "sheep",
    "frog", "bee", "snake", "animal",
}
# (German infinitive, English base form, valency): "i" intransitive, "t" transitive, "d" ditransitive
VERBS = [
    ("sehen", "see", "t"), ("kaufen", "buy", "t"), ("finden", "find", "t"), ("nehmen", "take", "t"),
    ("brauchen", "need", "t"), ("lieben", "love", "t"), ("malen", "paint", "t"), ("tragen", "carry", "t"),
    ("halten", "hold", "t"), ("essen", "eat", "t"), ("lesen", "read", "t"), ("holen", "fetch", "t"),
    ("waschen", "wash", "t"), ("verkaufen", "sell", "t"), ("besuchen", "visit", "t"), ("hören", "hear", "t"),
    ("fangen", "catch", "t"), ("kennen", "know", "t"), ("suchen", "look for", "t"), ("bauen", "build", "t"),
    ("reparieren", "repair", "t"), ("treffen", "meet", "t"), ("füttern", "feed", "t"),
    ("zeichnen", "draw", "t"),
    ("geben", "give", "d"), ("zeigen", "show", "d"), ("schicken", "send", "d"), ("bringen", "bring", "d"),
    ("schlafen", "sleep", "i"), ("laufen", "run", "i"), ("schwimmen", "swim", "i"), ("lachen", "laugh", "i"),
    ("warten", "wait", "i"), ("sitzen", "sit", "i"), ("stehen", "stand", "i"), ("singen", "sing", "i"),
    ("spielen", "play", "i"), ("arbeiten", "work", "i"), ("tanzen", "dance", "i"), ("weinen", "cry", "i"),
    ("springen", "jump", "i"), ("essen", "eat", "i"),
    # separable verbs: the prefix goes to the end of a main clause
    ("aufmachen", "open", "t"), ("zumachen", "close", "t"), ("anrufen", "phone", "t"),
    ("abholen", "pick up", "t"), ("einladen", "invite", "t"), ("anschauen", "look at", "t"),
    ("ausmachen", "switch off", "t"), ("anmachen", "switch on", "t"), ("wegwerfen", "throw away", "t"),
    ("mitbringen", "bring along", "t"), ("aufstehen", "get up", "i"), ("einschlafen", "fall asleep", "i"),
    ("ankommen", "arrive", "i"), ("aufwachen", "wake up", "i"), ("zurückkommen", "come back", "i"),
    ("weggehen", "go away", "i"),
]
SEPARABLE_PREFIXES = ("zurück", "auf", "zu", "an", "ab", "ein", "aus", "weg", "mit")
# (German adjective, English adjective)
ADJECTIVES = [
    ("groß", "big"), ("klein", "small"), ("alt", "old"), ("jung", "young"), ("neu", "new"), ("rot", "red"),
    ("blau", "blue"), ("grün", "green"), ("gelb", "yellow"), ("schwarz", "black"), ("weiß", "white"),
    ("schön", "beautiful"), ("gut", "good"), ("schnell", "fast"), ("langsam", "slow"), ("lang", "long"),
    ("kurz", "short"), ("warm", "warm"), ("kalt", "cold"), ("heiß", "hot"), ("leer", "empty"),
    ("voll", "full"), ("müde", "tired"), ("hungrig", "hungry"), ("klug", "clever"),
    ("freundlich", "friendly"), ("laut", "loud"), ("leise", "quiet"), ("schwer", "heavy"),
    ("billig", "cheap"), ("rund", "round"), ("braun", "brown"), ("grau", "grey"), ("sauber", "clean"),
    ("schmutzig", "dirty"), ("krank", "ill"), ("glücklich", "happy"), ("traurig", "sad"),
    ("stark", "strong"), ("dünn", "thin"),
]


@dataclass(frozen=True)
class Noun:
    de: str
    de_plural: str
    gender: str  # "m" | "f" | "n"
    en: str
    en_plural: str


@dataclass(frozen=True)
class Verb:
    de: str  # infinitive, also the 3rd person plural present (e.g. "aufmachen")
    de_3sg: str  # 3rd person singular present, unsplit (e.g. "macht")
    prefix: str  # separable prefix or ""
    en: str  # base form ("look for")
    en_3sg: str  # "looks for"
    valency: str  # "i" | "t" | "d"

    @property
    def de_stem_plural(self) -> str:
        """Finite plural of a main clause without the separable prefix: ``aufmachen`` -> ``machen``."""
        return self.de[len(self.prefix) :]


@dataclass(frozen=True)
class Adjective:
    de: str
    en: str


@dataclass(frozen=True)
class Lexicon:
    nouns: tuple[Noun, ...]
    verbs: tuple[Verb, ...]
    adjectives: tuple[Adjective, ...]
    missing: tuple[str, ...]  # curated words Ding did not give us

    def subset(self, nouns: int, adjectives: int) -> Lexicon:
        """The first ``nouns`` nouns and ``adjectives`` adjectives (the lists run from common to rarer)."""
        return Lexicon(self.nouns[:nouns], self.verbs, self.adjectives[:adjectives], self.missing)


_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\)|<[^>]*>")
_ARGUMENT = re.compile(r"(?<![\w.])((jdn|jdm|jds|etw)\.(/(jdn|jdm|etw)\.)?|sth\.|sb\.’s|sb\.)\s*")


def clean(text: str) -> str:
    """Drop Ding annotations (``{}``, ``[]``, ``()``, ``<>``) and argument markers; squeeze spaces."""
    text = _ARGUMENT.sub("", _ANNOTATION.sub("", text))
    return " ".join(text.split())


@lru_cache(maxsize=2)
def ding_lines(path: str | Path = DING_PATH) -> tuple[str, ...]:
    """The dictionary's entry lines (comments dropped). Raises ``FileNotFoundError`` naming the package."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(_MISSING.format(path=path))
    text = path.read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if " :: " in line and not line.startswith("#"))


@lru_cache(maxsize=2)
def ding_sha256(path: str | Path = DING_PATH) -> str:
    """SHA-256 of the dictionary file (it enters the translation data key)."""
    import hashlib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(_MISSING.format(path=path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


_LEADING = ("jdn./etw. ", "jdm./etw. ", "etw. ", "jdn. ", "jdm. ", "jds. ", "sich ")


def _head_token(line: str) -> str:
    """First word of the headword, skipping a leading ``(...)`` and argument markers (fast, no regex)."""
    head = line[:80]
    while True:
        if head.startswith("(") and ") " in head:
            head = head[head.index(") ") + 2 :]
            continue
        prefix = next((p for p in _LEADING if head.startswith(p)), None)
        if prefix is None:
            return head.split(" ", 1)[0].split(";", 1)[0]
        head = head[len(prefix) :]


def _split(line: str) -> tuple[list[list[str]], list[list[str]]]:
    """``(German fields, English fields)``, each field a list of its raw alternatives."""
    german, english = line.split(" :: ", 1)
    return (
        [[a.strip() for a in field.split(";")] for field in german.split(" | ")],
        [[a.strip() for a in field.split(";")] for field in english.split(" | ")],
    )


def _index(lines: tuple[str, ...], wanted: set[str]) -> dict[str, list[str]]:
    """Lines by the cleaned first alternative of their headword, for the ``wanted`` headwords only."""
    index: dict[str, list[str]] = {}
    for line in lines:
        if _head_token(line) not in wanted:
            continue  # cheap pre-filter: cleaning all 200k lines would take seconds
        head = clean(line.split(" :: ", 1)[0].split(" | ", 1)[0].split(";", 1)[0])
        index.setdefault(head, []).append(line)
    return index


def _find_noun(index, de: str, en: str) -> Noun | None:
    fallback = None
    for line in index.get(de, []):
        german, english = _split(line)
        gender = re.search(r"\{([mfn])\}", german[0][0])
        if not gender or len(german) < 2 or "{pl}" not in german[1][0]:
            continue
        plural = clean(german[1][0])
        en_plural = clean(english[1][0]) if len(english) > 1 else ""
        noun = Noun(de, plural, gender.group(1), en, en_plural or en + "s")
        if clean(english[0][0]) == en and en_plural:
            return noun
        fallback = fallback or Noun(de, plural, gender.group(1), en, _english_plural(en))
    return fallback


def _english_plural(word: str) -> str:
    if re.search(r"(s|sh|ch|x)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _english_3sg(verb: str) -> str:
    head, _, rest = verb.partition(" ")
    if re.search(r"(s|sh|ch|x|o)$", head):
        head += "es"
    elif re.search(r"[^aeiou]y$", head):
        head = head[:-1] + "ies"
    else:
        head += "s"
    return f"{head} {rest}".strip()


def _german_3sg_rule(stem: str) -> str:
    if re.search(r"(t|d|chn|ffn|gn)$", stem):
        return stem + "et"
    if re.search(r"(s|ß|z)$", stem):
        return stem + "t"
    return stem + "t"


def _third_person(index, de: str, prefix: str) -> str | None:
    """Ding's 3rd person singular of ``de``: a field ``er/sie <form> [prefix]`` (or ``<form> prefix``)."""
    pattern = re.compile(r"(?:er/sie )?(\S+t)" + (f" {prefix}" if prefix else ""))
    for line in index.get(de, []):
        german, _ = _split(line)
        if not re.search(r"\{v[it]*\}", ";".join(german[0])):
            continue
        for field in german[3:] if not prefix else german[1:]:
            text = clean(field[0])
            if (prefix or text.startswith("er/sie ")) and (match := pattern.fullmatch(text)):
                if match.group(1) not in {"ist/war", "hat/hatte"}:
                    return match.group(1)
    return None


def _find_verb(index, de: str, en: str, valency: str) -> Verb | None:
    if not any(re.search(r"\{v[it]*\}", ln.split(" :: ", 1)[0]) for ln in index.get(de, [])):
        return None
    prefix = next((p for p in SEPARABLE_PREFIXES if de.startswith(p) and len(de) > len(p) + 3), "")
    base = de[len(prefix) :]
    third = _third_person(index, de, prefix) or (prefix and _third_person(index, base, ""))
    if not third:
        third = _german_3sg_rule(base[:-2] if base.endswith("en") else base[:-1])
    return Verb(de, third, prefix, en, _english_3sg(en), valency)


@lru_cache(maxsize=2)
def load_lexicon(path: str | Path = DING_PATH) -> Lexicon:
    """The curated word lists, completed (gender, plurals, verb forms) from the Ding dictionary."""
    wanted = {w[0] for w in NOUNS + ADJECTIVES} | {v[0] for v in VERBS}
    wanted |= {v[0][len(p) :] for v in VERBS for p in SEPARABLE_PREFIXES if v[0].startswith(p)}
    index = _index(ding_lines(path), wanted)
    nouns, verbs, adjectives, missing = [], [], [], []
    for de, en in NOUNS:
        noun = _find_noun(index, de, en)
        (nouns.append(noun) if noun else missing.append(de))
    for de, en, valency in VERBS:
        verb = _find_verb(index, de, en, valency)
        (verbs.append(verb) if verb else missing.append(de))
    for de, en in ADJECTIVES:
        found = any("{adj}" in ln.split(" :: ", 1)[0].split(" | ", 1)[0] for ln in index.get(de, []))
        (adjectives.append(Adjective(de, en)) if found else missing.append(de))
    return Lexicon(tuple(nouns), tuple(verbs), tuple(adjectives), tuple(missing))
