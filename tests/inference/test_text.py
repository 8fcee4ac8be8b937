"""Stop strings across token boundaries and UTF-8 characters split across tokens."""

from inference.engine.text import StopMatcher, TextDecoder


def feed_all(matcher, pieces):
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


def test_a_stop_string_split_across_tokens_is_found_and_left_out():
    matcher = StopMatcher(["END"])
    assert feed_all(matcher, ["Hello E", "N", "D and more"]) == "Hello "
    assert matcher.stopped


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    matcher = StopMatcher(["END"])
    assert matcher.feed("Hello E") == "Hello "  # "E" is held back
    assert matcher.feed("xit") == "Exit"
    assert not matcher.stopped


def test_the_earliest_of_several_stop_strings_wins():
    assert feed_all(StopMatcher(["world", "lo w"]), ["hello world"]) == "hel"


def test_without_stop_strings_text_passes_straight_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc"
    assert matcher.flush() == ""


def test_a_character_split_across_tokens_is_never_replaced():
    data = "héllo 🐉 世界".encode()
    decoder = TextDecoder([])
    pieces = [decoder.feed(data[i : i + 1]) for i in range(len(data))] + [decoder.flush()]
    assert "".join(pieces) == "héllo 🐉 世界"
    assert "\ufffd" not in "".join(pieces)


def test_a_character_the_answer_never_finished_is_dropped_at_the_end():
    decoder = TextDecoder([])
    assert decoder.feed(b"ok\xf0\x9f") == "ok"  # max_tokens cut a 4-byte emoji after two bytes
    assert decoder.flush() == ""


def test_bytes_that_are_no_utf8_become_replacement_characters():
    decoder = TextDecoder([])
    assert decoder.feed(b"a\xffb") == "a\ufffdb"
    assert decoder.flush() == ""
