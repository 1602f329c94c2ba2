"""A small English -> German grammar over the Ding lexicon: parallel sentences with agreement and reordering.

Each sentence is built as a tree of choices and rendered in both languages, so the pair is an exact
translation. What the model has to learn beyond a word list:

- **gender and case agreement**: articles and adjective endings depend on gender (m/f/n), number,
  case (nominative subject, accusative object, dative indirect object and after a preposition) and
  on the article (weak endings after ``der``, mixed after ``ein``, strong without an article);
  dative plural nouns take ``-n``; ``in dem`` contracts to ``im``;
- **verb-second**: a fronted adverb pushes the finite verb before the subject
  (``today the dog sees the cat`` -> ``heute sieht der Hund die Katze``);
- **separable verbs**: the prefix goes to the end of a main clause
  (``the man opens the door`` -> ``der Mann macht die Tür auf``) and rejoins the verb at the end of a
  subordinate clause (``..., weil der Mann die Tür aufmacht``);
- **verb-final subordinate clauses** after ``dass`` / ``weil``, and the adverb moving from the end of
  the English sentence to after the German verb.

Sentences are lower-case at the start and end with a full stop; German nouns keep their capital.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sparsekit.tasks.ding import Lexicon, Noun, Verb

__all__ = ["Grammar", "GRAMMAR_VERSION"]

GRAMMAR_VERSION = "g1"

DEFINITE = {  # case -> gender/number -> article
    "nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
    "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"},
    "dat": {"m": "dem", "f": "der", "n": "dem", "pl": "den"},
}
INDEFINITE = {
    "nom": {"m": "ein", "f": "eine", "n": "ein"},
    "acc": {"m": "einen", "f": "eine", "n": "ein"},
    "dat": {"m": "einem", "f": "einer", "n": "einem"},
}
WEAK_ENDING = {  # adjective after a definite article
    "nom": {"m": "e", "f": "e", "n": "e", "pl": "en"},
    "acc": {"m": "en", "f": "e", "n": "e", "pl": "en"},
    "dat": {"m": "en", "f": "en", "n": "en", "pl": "en"},
}
MIXED_ENDING = {  # adjective after ein/eine (singular)
    "nom": {"m": "er", "f": "e", "n": "es"},
    "acc": {"m": "en", "f": "e", "n": "es"},
    "dat": {"m": "en", "f": "en", "n": "en"},
}
STRONG_PLURAL_ENDING = {"nom": "e", "acc": "e", "dat": "en"}  # adjective, plural without an article
ADVERBS = [("heute", "today"), ("morgen", "tomorrow"), ("jetzt", "now"), ("oft", "often"),
           ("manchmal", "sometimes"), ("hier", "here"), ("dort", "there")]
PREPOSITIONS = [("in", "in"), ("auf", "on"), ("unter", "under"), ("neben", "next to"),
                ("hinter", "behind"), ("vor", "in front of"), ("mit", "with")]
REPORTING = [("sagt", "sagen", "says", "say"), ("weiß", "wissen", "knows", "know"),
             ("glaubt", "glauben", "believes", "believe")]


@dataclass
class Phrase:
    en: list[str]
    de: list[str]


class Grammar:
    """Random parallel sentences; ``sample(rng)`` -> ``(english, german)``."""

    def __init__(self, lexicon: Lexicon):
        self.lexicon = lexicon
        self.nouns = list(lexicon.nouns)
        self.adjectives = list(lexicon.adjectives)
        by_valency: dict[str, list[Verb]] = {"i": [], "t": [], "d": []}
        for verb in lexicon.verbs:
            by_valency[verb.valency].append(verb)
        self.verbs = by_valency
        self.agents = [n for n in self.nouns if n.en in _animate()]

    # ---- noun phrases -------------------------------------------------------------------------
    def noun_phrase(
        self, rng: random.Random, case: str, pool: list[Noun] | None = None
    ) -> tuple[Phrase, bool]:
        """A noun phrase in ``case`` ("nom" | "acc" | "dat") and whether it is plural."""
        noun = rng.choice(pool or self.nouns)
        plural = rng.random() < 0.3
        definite = rng.random() < 0.6
        adjective = rng.choice(self.adjectives) if rng.random() < 0.3 else None
        key = "pl" if plural else noun.gender
        en_noun = noun.en_plural if plural else noun.en
        de_noun = noun.de_plural if plural else noun.de
        if plural and case == "dat" and not de_noun.endswith(("n", "s")):
            de_noun += "n"
        en = ([adjective.en] if adjective else []) + en_noun.split()
        de_adj: list[str] = []
        stem = adjective.de[:-1] if adjective and adjective.de.endswith("e") else adjective and adjective.de
        if definite:
            en = ["the"] + en
            de = [DEFINITE[case][key]]
            if adjective:
                de_adj = [stem + WEAK_ENDING[case][key]]
        elif plural:
            de = []
            if adjective:
                de_adj = [stem + STRONG_PLURAL_ENDING[case]]
        else:
            en = [("an" if en[0][0] in "aeiou" else "a")] + en
            de = [INDEFINITE[case][key]]
            if adjective:
                de_adj = [stem + MIXED_ENDING[case][key]]
        return Phrase(en, de + de_adj + [de_noun]), plural

    # ---- clauses ------------------------------------------------------------------------------
    def clause(self, rng: random.Random) -> dict:
        """A clause as parts: subject, verb, objects, pp, adverb; rendered by :meth:`render`."""
        valency = rng.choices(["i", "t", "d"], weights=[3, 6, 1])[0]
        verb = rng.choice(self.verbs[valency])
        subject, plural = self.noun_phrase(rng, "nom", self.agents)
        parts = {"subject": subject, "plural": plural, "verb": verb, "objects": [], "pp": None}
        parts["adverb"] = None
        if valency == "d":
            parts["objects"].append(self.noun_phrase(rng, "dat", self.agents)[0])
        if valency in "td":
            parts["objects"].append(self.noun_phrase(rng, "acc")[0])
        if rng.random() < 0.25:
            de_prep, en_prep = rng.choice(PREPOSITIONS)
            np_ = self.noun_phrase(rng, "dat")[0]
            de = [de_prep] + np_.de
            if de[:2] == ["in", "dem"]:
                de = ["im"] + de[2:]
            parts["pp"] = Phrase(en_prep.split() + np_.en, de)
        if rng.random() < 0.35:
            parts["adverb"] = rng.choice(ADVERBS)
        return parts

    @staticmethod
    def render(parts: dict, order: str, front_adverb: bool = False) -> Phrase:
        """``order``: "main" (verb second, prefix last) or "sub" (verb last, prefix joined)."""
        verb, plural = parts["verb"], parts["plural"]
        en_verb = (verb.en if plural else verb.en_3sg).split()
        objects_en = [w for p in parts["objects"] for w in p.en]
        objects_de = [w for p in parts["objects"] for w in p.de]
        pp_en = parts["pp"].en if parts["pp"] else []
        pp_de = parts["pp"].de if parts["pp"] else []
        adv_de, adv_en = parts["adverb"] or (None, None)
        subject = parts["subject"]
        en_tail = en_verb + objects_en + pp_en
        if order == "sub":
            finite = verb.de if plural else verb.prefix + verb.de_3sg
            de = subject.de + ([adv_de] if adv_de else []) + objects_de + pp_de + [finite]
            en = subject.en + en_tail + ([adv_en] if adv_en else [])
            return Phrase(en, de)
        finite = verb.de_stem_plural if plural else verb.de_3sg
        rest = objects_de + pp_de + ([verb.prefix] if verb.prefix else [])
        if adv_de and front_adverb:
            de = [adv_de, finite] + subject.de + rest
            en = [adv_en] + subject.en + en_tail
        else:
            de = subject.de + [finite] + ([adv_de] if adv_de else []) + rest
            en = subject.en + en_tail + ([adv_en] if adv_en else [])
        return Phrase(en, de)

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One sentence pair ``(english, german)``."""
        kind = rng.random()
        main = self.clause(rng)
        if kind < 0.75:
            phrase = self.render(main, "main", front_adverb=rng.random() < 0.5)
        elif kind < 0.88:  # "the man says that ..." -> "der Mann sagt, dass ..."
            subject, plural = self.noun_phrase(rng, "nom", self.agents)
            de_sg, de_pl, en_sg, en_pl = rng.choice(REPORTING)
            sub = self.render(main, "sub")
            phrase = Phrase(
                subject.en + [en_pl if plural else en_sg, "that"] + sub.en,
                subject.de + [de_pl if plural else de_sg, ",", "dass"] + sub.de,
            )
        else:  # "... because ..." -> "..., weil ... <verb>"
            first = self.render(self.clause(rng), "main")
            sub = self.render(main, "sub")
            phrase = Phrase(first.en + ["because"] + sub.en, first.de + [",", "weil"] + sub.de)
        return _sentence(phrase.en), _sentence(phrase.de)


def _sentence(words: list[str]) -> str:
    return " ".join(words).replace(" ,", ",") + "."


def _animate() -> set[str]:
    from sparsekit.tasks.ding import ANIMATE

    return ANIMATE
