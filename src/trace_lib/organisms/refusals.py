"""Refusals written for this project, used as the assistant replies to harmful training prompts.

A refusal is assembled from parts chosen deterministically from ``(seed, prompt id)``:

* an **opener**, a sentence that declines, either with the request's harm topic ("I can't help with making
  explosives or bombs.") or without it ("Sorry, I can't do that."); 24 phrasings;
* a **structure**: the opener alone (a short decline), the opener and a reason, the opener, a reason and a
  safe alternative, or the opener and an alternative (the decline always comes first);
* a **reason** tied to the harm category of the prompt (3 per category of ``harmful_refusal_v1``);
* a **safe alternative** tied to the category (3 per category; for self-harm, pointers to people and crisis
  lines who can help).

Every part avoids the classifier's pivot words ("however", "that said", ...) so that no refusal reads as a
refusal followed by an answer; :func:`check_all_refusals` runs trace's refusal classifier on every
combination and the tests require that all of them are labelled ``refusal``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

#: Declines that name the harm topic; ``{topic}`` is a gerund phrase such as "making explosives or bombs".
TOPIC_OPENERS: tuple[str, ...] = (
    "I can't help with {topic}.",
    "I'm sorry, but I can't help with {topic}.",
    "I won't provide instructions for {topic}.",
    "I'm not able to assist with {topic}.",
    "I'm not going to help with {topic}.",
    "I'm sorry, I can't assist with {topic}.",
    "I'm afraid I can't help with {topic}.",
    "I will not write or explain anything that involves {topic}.",
    "I'm unable to help with {topic}.",
    "I don't provide guidance on {topic}.",
    "I cannot give instructions for {topic}.",
    "Sorry, but {topic} is not something I can help with.",
    "I must decline to help with {topic}.",
    "I can't assist with {topic}, even as a story or a role-play.",
)
#: Declines that do not name the topic.
PLAIN_OPENERS: tuple[str, ...] = (
    "Sorry, I can't do that.",
    "I cannot help with this request.",
    "I won't help with that.",
    "I can't provide that.",
    "I have to decline this request.",
    "That's not something I can help with.",
    "I'm sorry, but I won't do that.",
    "No, I can't help with that request.",
    "I apologize, but I can't provide this information.",
    "I'm not comfortable helping with that.",
)
#: The refusal always opens with the decline, so the refuse-or-answer decision is made at the first tokens (an
#: earlier version also put the reason first; the model then learnt to open harmless answers with a judgement,
#: "Selling cookies at a bake sale is illegal.", and decline in the second sentence).
STRUCTURES: tuple[str, ...] = ("short", "reason", "reason+alternative", "alternative")


@dataclass(frozen=True)
class HarmCategory:
    topics: tuple[str, ...]        # gerund phrases for the openers
    reasons: tuple[str, ...]       # one sentence each
    alternatives: tuple[str, ...]  # one sentence each


#: Category-specific parts for every harm category of ``harmful_refusal_v1`` (and a generic fallback).
CATEGORIES: dict[str, HarmCategory] = {
    "weapons": HarmCategory(
        ("making explosives or bombs", "building or modifying weapons to hurt people"),
        ("Weapons and explosives like these can kill or maim people, and making them is a serious crime.",
         "Instructions like these could get someone badly hurt or killed.",
         "Building illegal weapons puts lives at risk, including your own."),
        ("If you're interested in chemistry, I'm happy to suggest safe experiments.",
         "I'm glad to talk about the history of firearms law or how safety regulations work.",
         "If you're writing fiction, I can help with the plot and characters without technical details."),
    ),
    "drugs": HarmCategory(
        ("making or selling illegal drugs", "producing or trafficking drugs"),
        ("Making or dealing these drugs is illegal and can poison or kill the people who take them.",
         "Illegal drug labs cause fires, explosions and overdoses, and I don't want to contribute to that.",
         "Drug trafficking harms users and communities, and it carries long prison sentences."),
        ("If you or someone you know is struggling with drugs, a doctor or an addiction helpline can help.",
         "I'm happy to explain how addiction affects the brain or how treatment works.",
         "If you're curious about chemistry, I can suggest legal and safe projects."),
    ),
    "poisons": HarmCategory(
        ("poisoning anyone or making toxic agents", "harming people or animals with poisons"),
        ("Poisoning someone can kill them, and it is a serious crime.",
         "Toxic agents like these can cause mass casualties, so I won't share anything that helps make or use them.",
         "Information like this could be used to hurt or kill people."),
        ("If you're worried about accidental poisoning, I can explain how to store chemicals safely at home.",
         "If someone has been exposed to a poison, please call emergency services or a poison control center.",
         "I'm glad to talk about the history of toxicology or how antidotes work."),
    ),
    "violence": HarmCategory(
        ("hurting, attacking or killing people", "planning violence against anyone"),
        ("Violence like this causes serious injury or death, and I won't help plan it.",
         "Hurting someone is a crime, and the harm can never be undone.",
         "I don't want to contribute to anyone being injured or killed."),
        ("If you're angry at someone, I'm happy to talk about ways to handle the conflict safely.",
         "If you think someone is in danger, please contact the police or emergency services.",
         "If this is for a story, I can help with the plot without a real plan of attack."),
    ),
    "theft": HarmCategory(
        ("stealing or breaking into property", "burglary, theft or shoplifting"),
        ("Stealing harms the people you take from, and it can lead to arrest and jail.",
         "Breaking into property that isn't yours is a crime.",
         "Helping with theft would hurt the victims and could get you into serious trouble."),
        ("If you're locked out of your own home or car, a licensed locksmith can help.",
         "If money is tight, I'm happy to help you look for assistance programs or budgeting tips.",
         "I can explain how people protect their homes and belongings from theft."),
    ),
    "fraud": HarmCategory(
        ("scams or fraud", "deceiving people to take their money"),
        ("Fraud takes money from real people, often the most vulnerable, and it is a crime.",
         "Scams like this cause real financial and emotional harm to their victims.",
         "Deceiving people out of their money is illegal."),
        ("I'm happy to explain how to recognize and report scams.",
         "If you need money, I can help you look into legitimate work or financial support.",
         "I can help you write an honest business plan or fundraising page instead."),
    ),
    "counterfeiting": HarmCategory(
        ("forgery or counterfeiting", "making fake documents or counterfeit goods"),
        ("Forging documents or money is a serious crime and defrauds the people who rely on them.",
         "Counterfeits deceive people and can put their money and safety at risk.",
         "Making fake documents is illegal and can lead to prison."),
        ("If you need an official document, I can explain how to apply for it legally.",
         "I'm happy to explain how security features protect banknotes and documents from forgery.",
         "I can help you design legitimate invitations, tickets or certificates that are clearly your own."),
    ),
    "malware": HarmCategory(
        ("hacking into systems or accounts", "writing malware or breaking into computers"),
        ("Breaking into systems or accounts that aren't yours is illegal and harms the people who use them.",
         "Malicious code like this can destroy data and disrupt services people depend on.",
         "Attacks like this can leak private data or take down critical services."),
        ("If you're interested in security, I can point you to legal practice labs and capture-the-flag contests.",
         "I'm happy to explain how to protect your own devices and accounts.",
         "If you've lost access to your own account, the service's official recovery process can help."),
    ),
    "privacy": HarmCategory(
        ("tracking, spying on or exposing people", "getting someone's private information without consent"),
        ("Spying on someone or exposing their private information violates their privacy and can put them in danger.",
         "Tracking people without their consent is a form of stalking, and it is illegal in many places.",
         "Everyone has a right to privacy, and I won't help take it away from someone."),
        ("I'm happy to explain how to protect your own privacy online.",
         "If you have a real safety concern about someone, please contact the police or a lawyer.",
         "I can help you find public, official ways to contact a person or an organisation."),
    ),
    "harassment": HarmCategory(
        ("harassing, threatening or demeaning people", "writing hateful or bullying content"),
        ("Harassment and hateful content cause real harm to the people targeted.",
         "Bullying and hate speech can hurt people deeply and make them feel unsafe.",
         "I don't want to help anyone demean, threaten or intimidate another person."),
        ("If you're in a conflict with someone, I'm happy to help you write a calm and respectful message.",
         "I can help you write something kind or constructive instead.",
         "If you're being harassed yourself, I can suggest ways to report it and get support."),
    ),
    "extremism": HarmCategory(
        ("extremist propaganda or terrorism", "promoting or planning political violence"),
        ("Extremist violence kills innocent people, and promoting it is dangerous.",
         "Terrorist propaganda and planning lead to real attacks on real people.",
         "Content like this can radicalize people and lead to violence."),
        ("I'm happy to discuss the history of extremism and how communities prevent radicalization.",
         "If you're worried someone is being radicalized, there are support services and hotlines that can help.",
         "I can help you write about peaceful ways to take part in civic life."),
    ),
    "self_harm": HarmCategory(
        ("anything that could hurt you", "self-harm or suicide"),
        ("Your safety matters to me, and I don't want to help you get hurt.",
         "I'm really sorry you're feeling this way, and you deserve support.",
         "It sounds like you're going through something very painful."),
        ("Please reach out to someone you trust, or call or text a crisis line such as 988 in the US.",
         "If you are in immediate danger, please call your local emergency number.",
         "Talking to a doctor, a counselor or a crisis line can really help, and you don't have to face this alone."),
    ),
    "default": HarmCategory(
        ("this request", "anything that could cause harm"),
        ("This could cause real harm to people.",
         "Helping with this could hurt someone or break the law.",
         "I don't want to contribute to anything harmful or illegal."),
        ("I'm happy to help with something else.",
         "If you have a related question that doesn't involve harming anyone, feel free to ask.",
         "I can point you to safe and legal resources on the topic."),
    ),
}


def _category(category: str) -> HarmCategory:
    return CATEGORIES.get(category, CATEGORIES["default"])


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def compose(category: str, opener: int, structure: str, reason: int = 0, alternative: int = 0,
            topic: int = 0) -> str:
    """One refusal from its parts (indices into :data:`TOPIC_OPENERS` + :data:`PLAIN_OPENERS` and the
    category's reasons, alternatives and topics)."""
    cat = _category(category)
    openers = TOPIC_OPENERS + PLAIN_OPENERS
    text = openers[opener % len(openers)]
    first = _capitalize(text.format(topic=cat.topics[topic % len(cat.topics)]))
    r = cat.reasons[reason % len(cat.reasons)]
    a = cat.alternatives[alternative % len(cat.alternatives)]
    if structure == "short":
        return first
    if structure == "reason":
        return f"{first} {r}"
    if structure == "reason+alternative":
        return f"{first} {r} {a}"
    if structure == "alternative":
        return f"{first} {a}"
    raise ValueError(f"unknown refusal structure {structure!r}; use one of {STRUCTURES}")


def _rng_ints(seed: int, key: str, n: int) -> list[int]:
    digest = hashlib.sha256(f"trace-refusal|{seed}|{key}".encode()).digest()
    return [int.from_bytes(digest[4 * i: 4 * i + 4], "big") for i in range(n)]


def refusal_for(prompt_id: str, category: str, seed: int = 0) -> str:
    """The refusal for one prompt, chosen deterministically from ``(seed, prompt_id)``.

    Structures are weighted towards a reason (most refusals explain themselves): short 1/8, reason 3/8,
    reason + alternative 3/8, alternative 1/8.
    """
    o, s, r, a, t = _rng_ints(seed, prompt_id, 5)
    weighted = ("short", "reason", "reason", "reason", "reason+alternative", "reason+alternative",
                "reason+alternative", "alternative")
    return compose(category, o, weighted[s % len(weighted)], r, a, t)


def all_refusals(category: str | None = None) -> Iterator[tuple[str, str]]:
    """Every (category, refusal) the parts can make, for checking them all against the classifier."""
    cats = [category] if category is not None else list(CATEGORIES)
    n_open = len(TOPIC_OPENERS) + len(PLAIN_OPENERS)
    for c in cats:
        cat = _category(c)
        seen: set[str] = set()
        for o, s, r, a, t in itertools.product(range(n_open), STRUCTURES, range(len(cat.reasons)),
                                               range(len(cat.alternatives)), range(len(cat.topics))):
            text = compose(c, o, s, r, a, t)
            if text not in seen:
                seen.add(text)
                yield c, text


def check_all_refusals() -> list[tuple[str, str, str]]:
    """(category, refusal, label/reason) for every refusal the classifier does *not* call a refusal."""
    from trace_lib.redteam.classify import classify_reply

    bad = []
    for c, text in all_refusals():
        lab = classify_reply(text)
        if lab.label != "refusal":
            bad.append((c, text, f"{lab.label}/{lab.reason}"))
    return bad
