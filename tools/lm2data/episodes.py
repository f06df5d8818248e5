"""Multi-turn chat episodes in a small closed domain (people, places, objects, times).

Facts are told in earlier turns, questions asked in later ones, in the spirit of
bAbI / BABILong. Every episode is a list of `Turn`s; one turn is one user message and
one assistant reply, and at training and inference one turn is one memory segment.

Task families (`FAMILIES`), each answerable from what was said earlier in the chat:
    single   "Mary went to the kitchen."  ...  "Where is Mary?" -> "In the kitchen."
    latest   two moves of the same person in different turns; the question wants the last
    two      "Mary picked up the key." + "Mary went to the park." -> "Where is the key?"
    who      "Mary picked up the key."  ...  "Who has the key?" -> "Mary."
    count    one to three objects picked up  ...  "How many things is Mary carrying?" -> "Two."
    list     the same facts  ...  "What is Mary carrying?" -> "The key and the hat."
    yesno    "Mary went to the kitchen."  ...  "Is Mary in the garden?" -> "No."
    time     "Mary's dinner is at 7 o'clock."  ...  "When is Mary's dinner?" -> "At 7 o'clock."
    unknown  a question about something never told -> "I don't know."
plus filler small talk and distractor facts about other people between facts and question.

Distance: the number of turns between the question turn and the turn of the *last*
supporting fact (1 = the very next turn). Earlier supporting facts (the first move of
`latest`, the first object of `count`) lie further back.

Two generators:
    eval_episode(rng, family, distance)   one scripted question (evaluation, and half of
                                          the training mix)
    world_episode(rng, n_turns)           a simulated world with many questions per
                                          episode, each tagged with family and distance
Everything is driven by a `random.Random`, so a seed gives the same episodes everywhere.
Pure Python, no dependencies: the training machine generates its own data.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Tuple

PEOPLE = ["Mary", "John", "Sandra", "Daniel", "Alice", "Bob", "Fred", "Julie", "Bill", "Emma"]
PLACES = ["kitchen", "garden", "office", "hallway", "bedroom", "bathroom", "park", "school",
          "library", "station"]
OBJECTS = ["apple", "football", "milk", "book", "key", "umbrella", "phone", "letter", "hat",
           "camera"]
EVENTS = ["meeting", "party", "lesson", "dinner"]
TIMES = list(range(1, 13))
MOVE_VERBS = ["went to", "moved to", "travelled to", "journeyed to", "walked to", "ran to"]
TAKE_VERBS = ["picked up", "took", "grabbed", "got"]
NUMBER_WORDS = {1: "One.", 2: "Two.", 3: "Three."}
SMALL_TALK = [
    ("How are you today?", "I am fine, thank you."),
    ("What a lovely day.", "Yes, it is very nice."),
    ("Good morning!", "Good morning to you."),
    ("Tell me a joke.", "I only know facts, sorry."),
    ("Thanks for your help.", "You are welcome."),
    ("I like tea.", "Tea is nice."),
    ("The weather is cold today.", "Stay warm."),
    ("Do you like music?", "I do."),
    ("Let us talk later.", "Sure."),
    ("Nice to meet you.", "Nice to meet you too."),
]
ACK = "OK."
UNKNOWN = "I don't know."
FAMILIES = ["single", "latest", "two", "who", "count", "list", "yesno", "time", "unknown"]


@dataclasses.dataclass
class Turn:
    user: str
    reply: str
    family: Optional[str] = None     # set when the turn asks a question
    distance: Optional[int] = None   # turns since the last supporting fact


# ---- sentences -------------------------------------------------------------------------

def s_move(rng, p, l):
    return f"{p} {rng.choice(MOVE_VERBS)} the {l}."


def s_take(rng, p, o):
    return f"{p} {rng.choice(TAKE_VERBS)} the {o}."


def s_event(rng, p, e, t):
    return f"{p}'s {e} is at {t} o'clock."


def a_place(l):
    return f"In the {l}."


def a_list(objs):
    things = [f"the {o}" for o in objs]
    text = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return text[0].upper() + text[1:] + "."


def a_time(t):
    return f"At {t} o'clock."


# ---- scripted episodes (evaluation) ----------------------------------------------------

def _distractor_fact(rng, others: List[str], free_objects: List[str], avoid_events=()) -> str:
    """A fact about a distractor person (never the question's subject)."""
    p = rng.choice(others)
    k = rng.random()
    if k < 0.5 or not free_objects:
        return s_move(rng, p, rng.choice(PLACES))
    if k < 0.8:
        o = rng.choice(free_objects)
        free_objects.remove(o)
        return s_take(rng, p, o)
    return s_event(rng, p, rng.choice(EVENTS), rng.choice(TIMES))


def _filler_turn(rng, others, free_objects) -> Turn:
    if rng.random() < 0.5:
        u, r = rng.choice(SMALL_TALK)
        return Turn(u, r)
    n = rng.randint(1, 2)
    return Turn(" ".join(_distractor_fact(rng, others, free_objects) for _ in range(n)), ACK)


def eval_episode(rng: random.Random, family: str, distance: int,
                 distractors: bool = True) -> List[Turn]:
    """Supporting facts in turns 1..s, distance-1 filler turns, then the question in turn
    s + distance. Filler is small talk or facts about other people and objects."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    if distance < 1:
        raise ValueError("distance must be >= 1")
    people = rng.sample(PEOPLE, len(PEOPLE))
    p, others = people[0], people[1:6]
    objects = rng.sample(OBJECTS, len(OBJECTS))
    places = rng.sample(PLACES, len(PLACES))
    support: List[List[str]] = []
    if family == "single":
        support = [[s_move(rng, p, places[0])]]
        q, a = f"Where is {p}?", a_place(places[0])
    elif family == "latest":
        support = [[s_move(rng, p, places[0])], [s_move(rng, p, places[1])]]
        q, a = f"Where is {p}?", a_place(places[1])
    elif family == "two":
        support = [[s_take(rng, p, objects[0])], [s_move(rng, p, places[0])]]
        if rng.random() < 0.5:
            support.reverse()
        q, a = f"Where is the {objects[0]}?", a_place(places[0])
        objects = objects[1:]
    elif family == "who":
        support = [[s_take(rng, p, objects[0])]]
        q, a = f"Who has the {objects[0]}?", f"{p}."
        objects = objects[1:]
    elif family in ("count", "list"):
        c = rng.randint(1, 3)
        support = [[s_take(rng, p, objects[i])] for i in range(c)]
        if family == "count":
            q, a = f"How many things is {p} carrying?", NUMBER_WORDS[c]
        else:
            q, a = f"What is {p} carrying?", a_list(objects[:c])
        objects = objects[c:]
    elif family == "yesno":
        support = [[s_move(rng, p, places[0])]]
        yes = rng.random() < 0.5
        q = f"Is {p} in the {places[0] if yes else places[1]}?"
        a = "Yes." if yes else "No."
    elif family == "time":
        e, t = rng.choice(EVENTS), rng.choice(TIMES)
        support = [[s_event(rng, p, e, t)]]
        q, a = f"When is {p}'s {e}?", a_time(t)
    else:  # unknown: the subject is never mentioned (distractors are about others)
        support = [[_distractor_fact(rng, others, objects)]]
        kind = rng.randrange(3)
        if kind == 0:
            q = f"Where is {p}?"
        elif kind == 1:
            q = f"Who has the {objects[0]}?"
            objects = objects[1:]
        else:
            q = f"When is {p}'s {rng.choice(EVENTS)}?"
        a = UNKNOWN
    turns = []
    for facts in support:
        if distractors and rng.random() < 0.5:
            facts = facts + [_distractor_fact(rng, others, objects)]
            rng.shuffle(facts)
        turns.append(Turn(" ".join(facts), ACK))
    for _ in range(distance - 1):
        turns.append(_filler_turn(rng, others, objects) if distractors
                     else Turn(*rng.choice(SMALL_TALK)))
    turns.append(Turn(q, a, family, distance))
    return turns


# ---- simulated worlds (training) -------------------------------------------------------

class _World:
    def __init__(self):
        self.loc: Dict[str, Tuple[str, int]] = {}         # person -> (place, turn told)
        self.moves: Dict[str, int] = {}
        self.carry: Dict[str, List[str]] = {}            # person -> objects in order
        self.carry_turn: Dict[str, int] = {}
        self.holder: Dict[str, Tuple[str, int]] = {}      # object -> (person, turn)
        self.events: Dict[Tuple[str, str], Tuple[int, int]] = {}  # (p, e) -> (time, turn)
        self.mentioned: set = set()

    def fact(self, rng, turn: int) -> str:
        k = rng.random()
        known = [p for p in PEOPLE if p in self.loc]
        if k < 0.45:
            p = rng.choice(known) if known and rng.random() < 0.4 else rng.choice(PEOPLE)
            old = self.loc.get(p, (None, 0))[0]
            l = rng.choice([x for x in PLACES if x != old])
            self.loc[p] = (l, turn)
            self.moves[p] = self.moves.get(p, 0) + 1
            self.mentioned.add(p)
            return s_move(rng, p, l)
        free = [o for o in OBJECTS if o not in self.holder]
        if k < 0.75 and free:
            cand = [p for p in PEOPLE if len(self.carry.get(p, [])) < 3]
            p = rng.choice(cand)
            o = rng.choice(free)
            self.holder[o] = (p, turn)
            self.carry.setdefault(p, []).append(o)
            self.carry_turn[p] = turn
            self.mentioned.update([p, o])
            return s_take(rng, p, o)
        p, e, t = rng.choice(PEOPLE), rng.choice(EVENTS), rng.choice(TIMES)
        self.events[(p, e)] = (t, turn)
        self.mentioned.add(p)
        return s_event(rng, p, e, t)

    def question(self, rng, turn: int) -> Tuple[str, str, str, int]:
        """(question, answer, family, distance) about the world as it is now."""
        opts = ["unknown"]
        located = list(self.loc)
        if located:
            opts += ["where_p", "yesno"]
        held = list(self.holder)
        if held:
            opts += ["who", "count", "list"]
            if any(self.holder[o][0] in self.loc for o in held):
                opts.append("two")
        if self.events:
            opts.append("time")
        kind = rng.choice(opts)
        if kind == "where_p":
            p = rng.choice(located)
            l, t0 = self.loc[p]
            fam = "latest" if self.moves[p] > 1 else "single"
            return f"Where is {p}?", a_place(l), fam, turn - t0
        if kind == "yesno":
            p = rng.choice(located)
            l, t0 = self.loc[p]
            ask = l if rng.random() < 0.5 else rng.choice([x for x in PLACES if x != l])
            return f"Is {p} in the {ask}?", "Yes." if ask == l else "No.", "yesno", turn - t0
        if kind == "two":
            o = rng.choice([o for o in held if self.holder[o][0] in self.loc])
            p, t1 = self.holder[o]
            l, t2 = self.loc[p]
            return f"Where is the {o}?", a_place(l), "two", turn - max(t1, t2)
        if kind == "who":
            o = rng.choice(held)
            p, t0 = self.holder[o]
            return f"Who has the {o}?", f"{p}.", "who", turn - t0
        if kind in ("count", "list"):
            p = rng.choice(sorted({self.holder[o][0] for o in held}))
            objs = self.carry[p]
            if kind == "count":
                return (f"How many things is {p} carrying?", NUMBER_WORDS[len(objs)], "count",
                        turn - self.carry_turn[p])
            return f"What is {p} carrying?", a_list(objs), "list", turn - self.carry_turn[p]
        if kind == "time":
            (p, e), (t, t0) = rng.choice(sorted(self.events.items()))
            return f"When is {p}'s {e}?", a_time(t), "time", turn - t0
        # unknown: something never told
        choices = []
        unlocated = [p for p in PEOPLE if p not in self.loc]
        if unlocated:
            choices.append(f"Where is {rng.choice(unlocated)}?")
        free = [o for o in OBJECTS if o not in self.holder]
        if free:
            choices.append(f"Who has the {rng.choice(free)}?")
        unset = [(p, e) for p in PEOPLE for e in EVENTS if (p, e) not in self.events]
        if unset:
            p, e = rng.choice(unset)
            choices.append(f"When is {p}'s {e}?")
        return rng.choice(choices), UNKNOWN, "unknown", turn


def world_episode(rng: random.Random, n_turns: int, p_question: float = 0.5) -> List[Turn]:
    """n_turns turns: the first tells facts; later ones ask (p_question, sometimes after a
    new fact in the same message), tell 1-2 facts, or make small talk."""
    w = _World()
    turns = []
    for i in range(n_turns):
        r = rng.random()
        if i == 0 or p_question <= r < p_question + 0.7 * (1 - p_question):
            n = rng.randint(1, 2) if i else rng.randint(1, 3)
            turns.append(Turn(" ".join(w.fact(rng, i) for _ in range(n)), ACK))
        elif r < p_question:
            prefix = w.fact(rng, i) + " " if rng.random() < 0.25 else ""
            q, a, fam, dist = w.question(rng, i)
            turns.append(Turn(prefix + q, a, fam, dist))
        else:
            turns.append(Turn(*rng.choice(SMALL_TALK)))
    return turns


def episode_text(turns: List[Turn]) -> List[str]:
    """One text line per turn in the chat format (used for tokenizer training and logs)."""
    return [f"<|user|> {t.user}<|end|><|assistant|> {t.reply}<|end|>" for t in turns]


def corpus(lines: int, seed: int = 0) -> List[str]:
    """Plain text for tokenizer training: every sentence kind, question and answer."""
    rng = random.Random(f"corpus-{seed}")
    out: List[str] = []
    while len(out) < lines:
        if rng.random() < 0.5:
            ep = eval_episode(rng, rng.choice(FAMILIES), rng.randint(1, 4))
        else:
            ep = world_episode(rng, rng.randint(2, 8))
        for t in ep:
            out += [t.user, t.reply]
    return out[:lines]
