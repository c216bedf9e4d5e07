"""Zero-shot minimal pairs after a short demo pretraining: far above a randomly initialised model."""

from transformers import AutoModelForMaskedLM, AutoTokenizer

from ltgbert import LtgBertForMaskedLM
from ltgbert.zeroshot import evaluate_blimp, load_blimp


def test_pretraining_beats_random_initialisation_on_demo_pairs(pretrained_demo_dir, demo_data):
    tokenizer = AutoTokenizer.from_pretrained(pretrained_demo_dir)
    pretrained = AutoModelForMaskedLM.from_pretrained(pretrained_demo_dir)
    random_init = LtgBertForMaskedLM(pretrained.config)
    pairs = load_blimp(demo_data.blimp_dir)
    trained = evaluate_blimp(pretrained, tokenizer, pairs)
    untrained = evaluate_blimp(random_init, tokenizer, pairs)
    print("pretrained", trained["overall"], trained["by_uid"], "random", untrained["overall"])
    assert 0.35 < untrained["overall"] < 0.65  # a random model sits near chance
    assert trained["overall"] > untrained["overall"] + 0.15
    assert trained["sentences_per_second"] > 0
