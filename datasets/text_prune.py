"""UIT/SEN caption pruning to key words, offline.

SEN (Delong-liu-bupt/SEN @ 3d887c1, datasets/bases.py ImageTextMAEDataset.filter_sentence) keeps
the NLTK tokens tagged PRP*, NN* or JJ*. ``pos_approx`` approximates that with a Treebank-like
regex tokeniser and closed-class drop lists, applied in order on lower-cased tokens: 1 tokenise,
2 drop numbers, 3 keep pronouns, 4 keep hyphenated tokens, 5 drop closed-class words, 6 drop verb
forms, 7 drop -ing words, 8 drop -ly words, 9 keep the rest, 10 return the caption itself when
nothing survives. ``attribute_only`` is a narrower whitelist ablation. Pure Python: no NLTK, no
downloads.
"""
from __future__ import annotations

import re
from collections.abc import Callable

PRUNE_MODES = ("pos_approx", "attribute_only")


def _words(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text``."""
    return frozenset(text.split())


# Rule 1: letter/digit runs with internal hyphens or apostrophes; everything else is punctuation.
_WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
# Rule 1: clitics split off a word's end and dropped (Treebank's POS / VBZ / MD / RB pieces).
_CLITIC_RE = re.compile(r"(?:n['’]t|['’](?:s|re|m|ve|ll|d))$", re.IGNORECASE)
# Rule 1: Treebank's "ca n't" / "wo n't" / "sha n't" hosts, restored so rule 5 drops the modal.
_NEGATED_MODALS = {"ca": "can", "wo": "will", "sha": "shall"}

# Rule 2: number words (CD). Ordinals (first, second, ...) are JJ and stay.
_NUMBER_WORDS = _words("""
    zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty hundred thousand dozen
""")

# Rule 3: personal and possessive pronouns (PRP, PRP$), always kept.
_PRONOUNS = _words("""
    i me my mine you your he him his she her hers it its we us our they them their theirs
    himself herself itself themselves
""")

# Rule 5: closed-class words: determiners and wh-words, prepositions and subordinators,
# conjunctions, modals, adverbs.
_CLOSED_CLASS = _words("""
    a an the this that these those each every some any no all both either neither another such
    half which what whatever who whom whose there
    about above across after against along alongside amid among around as at atop before behind
    below beneath beside besides between beyond by despite down during except for from in inside
    into like near of off on onto out outside over past per since than through throughout till to
    toward towards under underneath until up upon via with within without because if while
    whether although though unless whereas
    and or but nor plus yet so
    can could may might must shall should will would
    also very slightly just only too not never rather quite really almost mostly partly currently
    probably possibly apparently maybe perhaps then here where when how why away forward together
    well more most less least somewhat fairly even still already again else instead nearly
""")

# Rule 6: verb surface forms (not lemmas: tie, pair, face, cover, dress, top, ... are nouns too).
_VERB_FORMS = _words("""
    be am is are was were been being
    has have had having
    do does did doing done
    wear wears wore worn wearing
    carry carries carried carrying
    hold holds held holding
    walk walks walked walking
    stand stands stood standing
    look looks looked looking
    appear appears appeared
    seem seems seemed
    go goes went gone going
    see sees saw seen
    get gets got gotten
    make makes made
    keep keeps kept
    put puts
    pull pulls pulled
    push pushes pushed
    ride rides rode ridden
    sit sits sat sitting
    run runs ran running
    lean leans leaned
    wait waits waited
    talk talks talked
    use uses used using
    play plays played
    come comes came coming
    reach reaches reached
    show shows showed shown
    hang hangs hung
    tucked rolled tied slung draped attached paired covered
    faces faced facing
    dressed dressing
    crossed crossing
    dons donned
""")

# Rules 1 and 6 for CLIP's pre-tokenisation, which splits "doesn't" into "doesn" + "'t" where
# Treebank gives "does" + "n't": these hosts are dropped like the verbs and modals they stand for.
_NEGATION_HOSTS = _words("""
    ain aren couldn didn doesn don hadn hasn haven isn mightn mustn needn shan shouldn wasn weren
    won wouldn
""")

# Rule 7: nouns/adjectives ending in "ing" that the -ing (VBG) rule keeps.
_ING_KEEP = _words("""
    clothing earring earrings ring rings string strings stocking stockings legging leggings lining
    building buildings thing things something anything nothing everything sling spring evening
    morning railing padding piping trimming ceiling wing wings matching
""")

# Rule 8: adjectives/nouns ending in "ly" that the -ly (adverb) rule keeps.
_LY_KEEP = _words("""
    curly frilly elderly early ugly lovely friendly woolly wooly burly portly belly family silly
    daily chilly sparkly bubbly
""")

# attribute_only lexicon (the whitelist ablation; plus the rule-3 pronouns). Generic nouns and
# adjectives (side, bottom, back, left, right, young, old, thin, tall) are deliberately absent.
_COLOURS = _words("""
    black white grey gray red blue green yellow orange pink purple brown tan beige khaki navy
    maroon dark light violet cream ivory gold golden silver bronze copper burgundy crimson scarlet
    turquoise teal cyan magenta olive lavender lilac peach coral charcoal camel mustard rose wine
    indigo aqua mint salmon fuchsia plum colored coloured colorful colourful multicolored
    multicoloured neon pastel bright pale greyish grayish bluish reddish greenish yellowish
    brownish pinkish purplish whitish blackish
""")
_GARMENTS = _words("""
    shirt t-shirt tshirt tee blouse top tank camisole jacket coat overcoat raincoat parka
    windbreaker blazer cardigan sweater jumper pullover hoodie sweatshirt fleece vest waistcoat
    jersey polo tunic suit uniform outfit dress gown skirt miniskirt pants trousers jeans shorts
    leggings tights stockings capris chinos slacks sweatpants joggers tracksuit jumpsuit overalls
    romper pajamas pyjamas robe apron poncho kimono shoe sneaker trainer boot sandal heel slipper
    loafer flats flip-flops sock footwear clothes clothing garment attire sleeve collar hood
    pocket zipper button cuff hem stripe logo pattern print
""")
_ACCESSORIES = _words("""
    bag backpack handbag purse tote satchel briefcase suitcase luggage wallet clutch pouch
    umbrella hat cap beanie helmet glasses sunglasses eyeglasses spectacles goggles scarf scarves
    shawl belt watch mask phone cellphone headphones earphones headband necklace bracelet earring
    ring tie glove mitten badge lanyard camera bottle cup book paper folder laptop box basket
    bicycle bike motorcycle scooter stroller cart trolley skateboard leash strap stick cane
""")
_HAIR_BODY = _words("""
    hair ponytail pigtail braid bun bangs fringe beard mustache moustache head face forehead neck
    shoulder arm hand wrist waist hip leg knee ankle foot feet skin
""")
_PERSON_NOUNS = _words("""
    man men woman women boy girl lady ladies gentleman gentlemen guy person people male female
    child children kid teenager teen adult pedestrian student individual
""")
_ATTRIBUTE_ADJECTIVES = _words("""
    long short striped plaid checked checkered patterned printed floral dotted spotted polka
    solid plain sleeveless sleeved hooded collared buttoned zipped ripped torn loose tight baggy
    fitted fitting oversized cropped length mid high low heeled flat leather denim cotton wool
    woolen woollen knit knitted lace silk fur furry suede canvas plastic metallic shiny sparkly
    transparent graphic curly straight wavy blonde blond bald braided haired frilly fluffy padded
    quilted puffy casual formal sporty athletic
""")
# Nouns whose regular plurals (-s, -es) are accepted too.
_COUNT_NOUNS = _GARMENTS | _ACCESSORIES | _HAIR_BODY | _PERSON_NOUNS
_ATTRIBUTE_LEXICON = _COUNT_NOUNS | _COLOURS | _ATTRIBUTE_ADJECTIVES | _PRONOUNS


def split_words(caption: str) -> list[str]:
    """Rule 1: the caption's word tokens in order and original case, clitics and punctuation
    dropped ("This girl's t-shirt, isn't it?" -> This girl t-shirt is it)."""
    words = []
    for token in _WORD_RE.findall(caption):
        if token.lower() == "cannot":  # Treebank: can + not
            words += [token[:3], token[3:]]
            continue
        clitic = _CLITIC_RE.search(token)
        if clitic is not None:
            stem = token[:clitic.start()]
            modal = _NEGATED_MODALS.get(stem.lower()) if clitic.group()[0] in "nN" else None
            token = (modal.capitalize() if stem[0].isupper() else modal) if modal else stem
        if token:
            words.append(token)
    return words


def _keep_pos_approx(word: str) -> bool:
    """Rules 2-9 on one lower-cased rule-1 token."""
    if any(ch.isdigit() for ch in word) or word in _NUMBER_WORDS:
        return False
    if word in _PRONOUNS or "-" in word:
        return True
    if word in _CLOSED_CLASS or word in _VERB_FORMS or word in _NEGATION_HOSTS:
        return False
    if len(word) > 4 and word.endswith("ing"):
        return word in _ING_KEEP
    if word.endswith("ly"):
        return word in _LY_KEEP
    return True


def _in_lexicon(word: str) -> bool:
    """In the attribute_only lexicon, counting regular plurals of its nouns."""
    return (word in _ATTRIBUTE_LEXICON
            or (word.endswith("s") and word[:-1] in _COUNT_NOUNS)
            or (word.endswith("es") and word[:-2] in _COUNT_NOUNS))


def _keep_attribute_only(word: str) -> bool:
    """A lexicon word, or a hyphenated compound of lexicon words (short-sleeved, dark-blue)."""
    return _in_lexicon(word) or ("-" in word and all(map(_in_lexicon, word.split("-"))))


_FILTERS: dict[str, Callable[[str], bool]] = {
    "pos_approx": _keep_pos_approx,
    "attribute_only": _keep_attribute_only,
}


def _filter(mode: str) -> Callable[[str], bool]:
    """The per-token filter of ``mode``; ValueError for an unknown mode."""
    if mode not in _FILTERS:
        raise ValueError(f"unknown text prune mode {mode!r}; expected one of {PRUNE_MODES}")
    return _FILTERS[mode]


def is_key_word(word: str, mode: str = "pos_approx") -> bool:
    """Whether one word survives the filter. Punctuation, clitic pieces ("'s", "'t"), digits and
    anything that is not exactly one rule-1 word token give False."""
    keep = _filter(mode)
    if _WORD_RE.fullmatch(word) is None:
        return False
    words = split_words(word)
    return len(words) == 1 and keep(words[0].lower())


def prune_caption(caption: str, mode: str = "pos_approx") -> str:
    """The caption's key words joined by single spaces, in original order and case; the caption
    itself when none survives (rule 10)."""
    keep = _filter(mode)
    kept = [word for word in split_words(caption) if keep(word.lower())]
    return " ".join(kept) if kept else caption
