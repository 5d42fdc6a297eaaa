"""A seeded generator of English stories with long-range structure (text for the default corpus).

Each story fixes a small world at its start: a hero, a companion, a rival or helper, a home
town, three places and a treasured object. Every later paragraph draws from that world, so
names, places and the object introduced in the first paragraph recur minutes later, and later
paragraphs refer back to earlier episodes ("Mira remembered the day at the lighthouse"). A
spoken LM that keeps these consistent over minutes is modelling long-range structure.

Sentences come from several dozen templates over a vocabulary of several hundred words, so the
text is varied but fully deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import random
import re


def _words(text: str) -> tuple[str, ...]:
    """Word list from a `|`-separated (if any `|`) or space-separated string."""
    sep = "|" if "|" in text else None
    return tuple(w.strip() for w in text.split(sep) if w.strip())


_NAMES_F = _words(
    "Mira Anna Clara Rosa Elena Nora Lucy Ada Greta Iris Hazel Maya Olive Ruth Stella "
    "Tessa Vera Wendy Lena Martha"
)
_NAMES_M = _words(
    "Tobias Oscar Felix Hugo Jonas Leo Milo Arthur Samuel Victor Peter Daniel Edwin Frank "
    "George Henry Isaac Walter Simon Thomas"
)
_JOBS = _words(
    "baker|fisherman|carpenter|teacher|shepherd|painter|blacksmith|gardener|sailor|doctor|"
    "weaver|farmer|potter|librarian|miller|tailor|musician|clockmaker|beekeeper|"
    "lighthouse keeper|postman|cook|shoemaker|mapmaker"
)
_TRAITS = _words(
    "curious gentle stubborn clever brave quiet cheerful careful proud patient restless "
    "kind shy honest clumsy wise cautious generous"
)
_TOWNS = _words(
    "Millbrook Ashford Greenhollow Stonebridge Riverton Oakvale Fairhaven Elmstead "
    "Westmoor Brightwater Lindenfield Harrowgate Pinecrest Thornbury"
)
_PLACES = _words(
    "old mill|harbour|lighthouse|market square|orchard|bridge|forest|library|bakery|"
    "church tower|meadow|railway station|river bank|castle|farmhouse|school|garden|cave|"
    "hill|lake|workshop|inn|stable|museum|greenhouse|windmill|valley|island|tea house|"
    "boathouse"
)
_PLACE_ADJS = _words(
    "old quiet crowded windy narrow dusty bright forgotten little grand muddy peaceful "
    "dark sunny cold ancient"
)
_OBJECTS = _words(
    "key|lantern|map|violin|compass|pocket watch|letter|book|ring|music box|telescope|"
    "kite|umbrella|hat|painting|clock|basket|boat|locket|flute|candle|mirror|notebook|"
    "scarf|bell|coin|feather|teapot|shell|medal"
)
_OBJ_ADJS = _words(
    "brass silver golden wooden blue red green tiny heavy shiny broken painted velvet "
    "copper glass carved yellow purple"
)
_ANIMALS = _words(
    "cat dog goose horse fox owl crow goat rabbit duck donkey sheep squirrel robin hedgehog pony"
)
_FOODS = _words(
    "apple pie|warm bread|vegetable soup|cheese|plum cake|honey|porridge|"
    "roasted chestnuts|strawberries|pancakes|fish stew|biscuits|hot tea|lemonade|"
    "cherry tart|potatoes"
)
_WEATHER = _words(
    "the rain fell softly on the roofs|a cold wind blew from the sea|"
    "the sun was warm and bright|thick fog covered the streets|"
    "snow was falling over the town|the sky was grey and heavy|"
    "a storm was gathering over the hills|the evening air was still and mild|"
    "the morning was clear and cold|a light breeze moved the leaves"
)
_TIMES = _words(
    "early the next morning|that afternoon|late in the evening|after breakfast|"
    "the following day|a week later|at noon|before sunrise|on Sunday|just after midnight|"
    "later that day|when the bells rang at six"
)
_FEELINGS = _words(
    "worried happy tired excited nervous hopeful sad surprised calm angry grateful lonely "
    "proud puzzled"
)
_SOUNDS = _words(
    "a dog barking far away|the bells of the church|footsteps on the stairs|"
    "a song from an open window|the creak of an old door|waves against the rocks|"
    "the whistle of a train|children laughing in the street|thunder over the hills"
)
_COLOURS = _words("red blue green yellow white black brown grey orange")


@dataclasses.dataclass
class Character:
    name: str
    female: bool
    job: str
    trait: str

    @property
    def he(self) -> str:
        return "she" if self.female else "he"

    @property
    def him(self) -> str:
        return "her" if self.female else "him"

    @property
    def his(self) -> str:
        return "her" if self.female else "his"


@dataclasses.dataclass
class Story:
    """A generated story: `title` and `paragraphs` (each a few sentences of plain text)."""

    title: str
    paragraphs: list[str]
    characters: list[str]
    places: list[str]
    object: str

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


# Sentence templates. Slots: {A},{B},{C} characters (+ _he/_him/_his/_job/_trait), {town},
# {P} current place, {P1}..{P3} the story's places, {obj} the object, {objadj}, {animal},
# {food}, {weather}, {time}, {feel}, {sound}, {colour}, {mem} an earlier episode.
_INTRO = (
    "Once upon a time, in the town of {town}, there lived a {A_trait} {A_job} named {A}.",
    "In the small town of {town}, a {A_trait} {A_job} called {A} lived near the {P1}.",
    "Long ago, {A} the {A_job} lived in {town}, close to the {P1}.",
    "Everyone in {town} knew {A}, the {A_trait} {A_job} who worked by the {P1}.",
)
_INTRO_OBJ = (
    "{A_He} had a {objadj} {obj} that had once belonged to {A_his} grandmother.",
    "{A_His} most treasured possession was a {objadj} {obj}.",
    "{A_He} kept a {objadj} {obj} on the shelf above {A_his} bed.",
    "Nobody else in {town} had a {obj} like {A_his}, {objadj} and very old.",
)
_INTRO_B = (
    "{A_His} best friend was {B}, a {B_trait} {B_job}.",
    "Every morning {A} walked past the {P2} and waved to {B}, the {B_job}.",
    "{A_His} neighbour {B} was a {B_trait} {B_job} who worked at the {P2}.",
)
_INTRO_C = (
    "Not far away, beyond the {P3}, lived {C}, a {C_trait} {C_job}.",
    "People said that {C} the {C_job} knew every secret of the {P3}.",
    "At the {P3} lived an old {C_job} named {C}, who was {C_trait} and knew every path.",
)
_INTRO_MORE = (
    "{A_He} lived with {animal_colour_a} {animal} that followed {A_him} everywhere.",
    "The {P1} was {padj} and full of stories.",
    "{A} loved {food} more than anything else in the world.",
    "In {town}, {weather_long}.",
)
_TROUBLE = (
    "One day, the {objadj} {obj} was gone.",
    "But one morning {A} woke up and the {obj} had disappeared.",
    "Then, on a {padj} evening, {A} lost the {obj} somewhere near the {P2}.",
    "One night a stranger came to {town} and asked about the {objadj} {obj}.",
    "Soon {A} found a note that said the {obj} was hidden at the {P3}.",
)
_TROUBLE_MORE = (
    "{A} felt {feel} and did not know what to do.",
    "{A_He} {search} but the {obj} was nowhere to be found.",
    "{A_He} ran to tell {B} what had happened.",
    '"We must find it," said {B}, "before the winter comes."',
    '"Without the {obj}, nothing will be the same," said {A}.',
    "{B} promised to help, and together they made a plan.",
    "Outside, {weather}.",
)
_TRAVEL = (
    "{Time}, {A} and {B} walked to the {P}.",
    "{Time}, {A} asked {B} to come to the {P}.",
    "{Time}, {B} took {A} to the {P} on an old cart.",
    "{Time}, {A} set out for the {P} with a bag of {food}.",
    "{Time}, the two friends climbed the path to the {P}.",
)
_SCENE = (
    "The {P} was {padj}, and {weather}.",
    "At the {P} they heard {sound}.",
    "The {animal_colour} {animal} was sitting by the door of the {P}.",
    "Nobody had been to the {P} for many years.",
    "The walls of the {P} were covered with {colour} paint.",
    "Inside the {P} it smelled of {food} and old wood.",
    "Outside, {weather}.",
    "There was an old sign that said: {town} {P}.",
)
_ACTION = (
    "{A} {search} for the {obj}, but found only dust.",
    "{B} opened a heavy door and looked inside.",
    "They met {C} the {C_job}, who was {feel} to see them.",
    '"Have you seen a {objadj} {obj}?" asked {A}.',
    '"I saw something like it near the {Q}," said {C}.',
    "{C} gave them some {food} and told them a story about the {Q}.",
    "{A} found a {colour} thread caught on a nail.",
    "{B} noticed footprints leading towards the {Q}.",
    "{A} remembered {mem}.",
    "{A_He} thought about {mem} and smiled.",
    '"Do you remember {mem}?" asked {B}.',
    "The {animal} ran ahead of them, as if it knew the way.",
    "They sat down to rest, and {A} felt {feel}.",
    "{B} said that the {obj} must be close.",
    "{A} wrote in {A_his} notebook everything they had seen at the {P}.",
    "A {wind} wind blew through the {P}, and {B} shivered.",
    "{C} laughed and said that the {obj} was never really lost.",
    "For a long time nobody said a word.",
)
_END_OF_EPISODE = (
    "When it grew dark, they went back to {town}.",
    "They decided to look again the next day.",
    "That night {A} dreamed of the {objadj} {obj}.",
    "On the way home, {A} thought about what {C} had said.",
    "Tired but {good_feel}, they returned home.",
)
_FOUND = (
    "At last, at the {P}, {A} found the {objadj} {obj}.",
    "Finally, under an old blanket at the {P}, lay the {objadj} {obj}.",
    "And there, at the {P}, was the {obj}, shining in the light.",
)
_FOUND_MORE = (
    "{A} held the {obj} and felt {feel}.",
    "{B} laughed with joy.",
    '"I knew we would find it," said {B}.',
    "{A} thanked {C} for {C_his} help.",
    "They carried the {obj} back to the {P1} together.",
    "{A} thought of {mem} and everything that had happened since.",
)
_ENDING = (
    "From that day on, {A} kept the {obj} safe by the window of the {P1}.",
    "And every year, the people of {town} told the story of {A} and the {objadj} {obj}.",
    "{A}, {B} and {C} remained friends for the rest of their lives.",
    "The {animal} slept by the fire, and {town} was quiet again.",
    "And whenever {weather_short}, {A} remembered the search for the {obj}.",
    "That is the story of {A} the {A_job}, from the town of {town}.",
)
_WEATHER_SHORT = ("it rained", "the wind blew", "snow fell", "the fog came in", "the sun set")
_MEMORY_ACTS = (
    "the day they went to the {P}",
    "the {feel} evening at the {P}",
    "what {C} had said at the {P}",
    "the {colour} {animal} at the {P}",
    "the {food} they ate at the {P}",
)
_SEARCH = ("searched", "looked everywhere", "asked around", "hunted", "checked every corner")


class _Writer:
    def __init__(self, rng: random.Random, world: dict[str, str | Character]):
        self.rng = rng
        self.world = world
        self.memories: list[str] = []

    def slots(self, place: str | None) -> dict[str, str]:
        r = self.rng
        w = self.world
        d: dict[str, str] = {}
        for k in ("A", "B", "C"):
            c = w[k]
            assert isinstance(c, Character)
            d[k] = c.name
            d[k + "_job"] = c.job
            d[k + "_trait"] = c.trait
            d[k + "_he"], d[k + "_him"], d[k + "_his"] = c.he, c.him, c.his
            d[k + "_He"], d[k + "_His"] = c.he.capitalize(), c.his.capitalize()
        for k in ("town", "obj", "objadj", "animal", "P1", "P2", "P3"):
            d[k] = str(w[k])
        p = place or str(w["P1"])
        d["P"] = p
        others = [str(w[k]) for k in ("P1", "P2", "P3") if str(w[k]) != p]
        d["Q"] = r.choice(others)
        d["padj"] = r.choice(_PLACE_ADJS)
        d["wind"] = r.choice(("cold", "warm", "strong", "gentle", "sharp", "damp"))
        d["animal_colour"] = str(w["animal_colour"])
        d["food"] = r.choice(_FOODS + (str(w["food"]),) * 3)
        d["weather"] = r.choice(_WEATHER)
        d["weather_short"] = r.choice(_WEATHER_SHORT)
        d["Time"] = r.choice(_TIMES).capitalize()
        d["feel"] = r.choice(_FEELINGS)
        d["good_feel"] = r.choice(("happy", "hopeful", "calm", "grateful", "cheerful"))
        d["weather_long"] = r.choice(
            (
                "summers were long and warm",
                "winters were cold and dark",
                "it rained almost every week",
                "the wind never stopped",
            )
        )
        ac = str(w["animal_colour"])
        d["animal_colour_a"] = ("an " if ac[0] in "aeiou" else "a ") + ac
        d["sound"] = r.choice(_SOUNDS)
        d["colour"] = r.choice(_COLOURS)
        d["search"] = r.choice(_SEARCH)
        d["mem"] = r.choice(self.memories) if self.memories else f"the {w['P1']}"
        return d

    def say(self, templates: tuple[str, ...], place: str | None = None) -> str:
        t = self.rng.choice(templates)
        s = t.format(**self.slots(place))
        return s[0].upper() + s[1:]

    def remember(self, place: str) -> None:
        d = self.slots(place)
        self.memories.append(self.rng.choice(_MEMORY_ACTS).format(**d))

    def some(self, templates: tuple[str, ...], n: int, place: str | None = None) -> list[str]:
        out: list[str] = []
        tries = 0
        while len(out) < n and tries < 10 * n:
            s = self.say(templates, place)
            tries += 1
            if s not in out:
                out.append(s)
        return out


def generate_story(seed: int, num_paragraphs: int = 10, max_sentences: int | None = None) -> Story:
    """A story of `num_paragraphs` (>= 4) paragraphs, deterministic for `seed`.

    Paragraph 1 introduces the world, paragraph 2 the trouble, the middle ones are episodes at
    the story's places (with callbacks to earlier episodes), the last two resolve and close.
    `max_sentences` truncates every paragraph (for tiny test corpora).
    """
    if num_paragraphs < 4:
        raise ValueError(f"num_paragraphs must be >= 4, got {num_paragraphs}")
    r = random.Random(f"avjax-story-{seed}")
    females = r.sample(_NAMES_F, 3)
    males = r.sample(_NAMES_M, 3)
    chars = []
    jobs = r.sample(_JOBS, 3)
    traits = r.sample(_TRAITS, 3)
    for i in range(3):
        f = r.random() < 0.5
        chars.append(Character((females if f else males)[i], f, jobs[i], traits[i]))
    places = r.sample(_PLACES, 3)
    world: dict[str, str | Character] = {
        "A": chars[0],
        "B": chars[1],
        "C": chars[2],
        "town": r.choice(_TOWNS),
        "obj": r.choice(_OBJECTS),
        "objadj": r.choice(_OBJ_ADJS),
        "animal": r.choice(_ANIMALS),
        "animal_colour": r.choice(_COLOURS),
        "food": r.choice(_FOODS),
        "P1": places[0],
        "P2": places[1],
        "P3": places[2],
    }
    w = _Writer(r, world)
    paras: list[list[str]] = []
    # 1. Introduction: the hero, the object, the friend, the third character, the places.
    p = [w.say(_INTRO, places[0]), w.say(_INTRO_OBJ, places[0])]
    p += w.some(_INTRO_MORE, r.randint(1, 2), places[0])
    p += [w.say(_INTRO_B, places[0]), w.say(_INTRO_C, places[0])]
    paras.append(p)
    w.remember(places[0])
    # 2. The trouble.
    paras.append([w.say(_TROUBLE, places[1])] + w.some(_TROUBLE_MORE, r.randint(2, 4)))
    # 3..n-2: episodes at the story's places.
    num_episodes = num_paragraphs - 4
    for e in range(num_episodes):
        place = places[(e + 1) % 3] if r.random() < 0.8 else places[r.randrange(3)]
        p = [w.say(_TRAVEL, place)]
        p += w.some(_SCENE, r.randint(1, 2), place)
        p += w.some(_ACTION, r.randint(2, 4), place)
        p.append(w.say(_END_OF_EPISODE, place))
        paras.append(p)
        w.remember(place)
    # n-1: the object is found; n: the ending.
    final_place = places[2]
    paras.append([w.say(_FOUND, final_place)] + w.some(_FOUND_MORE, r.randint(2, 4), final_place))
    paras.append(w.some(_ENDING, r.randint(2, 3), places[0]))
    title = f"{chars[0].name} and the {world['objadj']} {world['obj']}"
    return Story(
        title=title,
        paragraphs=[_clean(" ".join(p[:max_sentences])) for p in paras],
        characters=[c.name for c in chars],
        places=list(places),
        object=f"{world['objadj']} {world['obj']}",
    )


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b([Aa]) ([aeiouAEIOU]|honest)", r"\1n \2", text)
