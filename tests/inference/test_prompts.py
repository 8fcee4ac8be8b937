"""The host prompt cache's bookkeeping on its own (the engine test loads real KV cells through it)."""

from inference.engine.prompts import SAVES_BEFORE_JUDGING, PromptCache, common_prefix


def test_the_saved_sequence_sharing_the_most_with_a_prompt_is_found():
    cache = PromptCache(1000)
    cache.put([1, 2, 3, 4], bytearray(10))
    cache.put([1, 2, 9, 9, 9], bytearray(10))
    assert cache.best([1, 2, 3, 7]) == ((1, 2, 3, 4), 3)
    assert cache.best([5]) == (None, 0)


def test_a_longer_sequence_replaces_the_saved_beginnings_it_holds():
    cache = PromptCache(1000)
    cache.put([1, 2, 3], bytearray(10))
    cache.put([1, 2, 3, 4, 5], bytearray(20))
    assert len(cache) == 1 and cache.bytes == 20


def test_past_its_bytes_the_least_recently_saved_go_first_and_too_big_is_never_kept():
    cache = PromptCache(100)
    for first in range(3):
        cache.put([first, 0, 0], bytearray(40))
    assert len(cache) == 2 and cache.best([0, 0, 0]) == (None, 0) and cache.bytes == 80
    cache.put([9] * 10, bytearray(101))
    assert cache.best([9])[0] is None


def test_a_taken_sequence_leaves_the_cache():
    cache = PromptCache(100)
    cache.put([1, 2], bytearray(30))
    assert cache.take((1, 2)) == bytearray(30) and cache.bytes == 0 and cache.take((1, 2)) is None


def test_common_prefixes_are_counted_across_the_chunks_compared_at_once():
    a = list(range(200))
    for cut in (0, 63, 64, 65, 130, 199):
        b = [*a[:cut], -1, *a[cut + 1 :]]
        assert common_prefix(a, b) == cut
    assert common_prefix(a, a[:150]) == 150 and common_prefix(tuple(a), tuple(a)) == 200


def test_saving_under_load_stops_while_saved_prompts_do_not_come_back_and_resumes_once_they_do():
    cache = PromptCache(1 << 20)
    saved = []
    for i in range(SAVES_BEFORE_JUDGING + 80):  # distinct prompts, none ever taken back
        if cache.worth_saving():
            cache.put([i, i, i], bytearray(10))
            saved.append((i, i, i))
    assert len(saved) == SAVES_BEFORE_JUDGING + 10  # every one at first, then one in eight: enough to see a change
    for tokens in saved:  # now they come back
        assert cache.take(tokens) is not None
    assert all(cache.worth_saving() for _ in range(5))
