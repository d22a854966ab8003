"""Unit tests of tree building, masks and positions on hand-made trees."""
import math
import random

import pytest
import torch

from decoding.tree import NEG_INF, ROOT, DraftTree, TreeConfig, TreeLayout, prune_tree, verify_positions, verify_visibility
from decoding.verify import greedy_accept

# Hand-made tree for one row (node: token, parent):
#   root ─ 0:a(10) ─ 2:c(12) ─ 4:e(14)
#        └ 1:b(11) └ 3:d(13)
TOKENS = torch.tensor([[10, 11, 12, 13, 14]])
PARENTS = torch.tensor([[-1, -1, 0, 0, 2]])
DEPTHS = torch.tensor([[1, 1, 2, 2, 3]])
VALID = torch.ones(1, 5, dtype=torch.bool)
ANCESTORS = {0: {0}, 1: {1}, 2: {0, 2}, 3: {0, 3}, 4: {0, 2, 4}}


def ancestors_of(parents: list[int]) -> torch.Tensor:
    """[1, N, N] ancestor-or-self matrix from a parent list (the closure, computed by hand)."""
    n = len(parents)
    anc = torch.zeros(1, n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != ROOT:
            anc[0, i, j] = True
            j = parents[j]
    return anc


def hand_tree(scores=None) -> DraftTree:
    scores = scores if scores is not None else torch.log(torch.tensor([[0.6, 0.3, 0.4, 0.15, 0.3]]))
    return DraftTree(tokens=TOKENS, parents=PARENTS, depths=DEPTHS, scores=scores, valid=VALID,
                     ancestors=ancestors_of(PARENTS[0].tolist()))


def test_verify_visibility_and_positions():
    tree = hand_tree()
    vis = verify_visibility(tree)[0]
    # slot 0 = root, slot i+1 = node i
    assert vis[0].tolist() == [True, False, False, False, False, False]
    assert vis[5].tolist() == [True, True, False, True, False, True]    # e sees root, a, c, itself
    assert vis[4].tolist() == [True, True, False, False, True, False]   # d sees root, a, itself
    assert vis[2].tolist() == [True, False, True, False, False, False]  # b sees root, itself
    pos = verify_positions(tree, torch.tensor([100]))
    assert pos.tolist() == [[100, 101, 101, 102, 102, 103]]


def test_greedy_accept_longest_matching_path():
    tree = hand_tree()
    V = 20
    logits = torch.zeros(1, 6, V)
    # target argmax: root -> 10 (a), a -> 12 (c), c -> 7 (no child 7) ; bonus = 7
    logits[0, 0, 10] = 5
    logits[0, 1, 12] = 5
    logits[0, 3, 7] = 5
    acc = greedy_accept(tree, logits)
    assert acc.paths == [[0, 2]] and acc.bonus.tolist() == [7]
    assert acc.tokens.tolist() == [[10, 12, 7, 0]] and acc.length.tolist() == [2]


def test_greedy_accept_root_rejected():
    tree = hand_tree()
    logits = torch.zeros(1, 6, 20)
    logits[0, 0, 3] = 5
    acc = greedy_accept(tree, logits)
    assert acc.paths == [[]] and acc.bonus.tolist() == [3]


def test_greedy_accept_child_of_rejected_node_never_accepted():
    tree = hand_tree()
    logits = torch.zeros(1, 6, 20)
    logits[0, 0, 11] = 5      # root -> b
    logits[0, 1, 12] = 5      # a -> c would match, but a is not accepted
    acc = greedy_accept(tree, logits)
    assert acc.paths == [[1]]


def test_greedy_accept_ignores_invalid_nodes():
    tree = hand_tree()
    tree.valid = torch.tensor([[True, True, False, True, True]])    # c masked: e cannot be reached
    logits = torch.zeros(1, 6, 20)
    logits[0, 0, 10] = 5
    logits[0, 1, 12] = 5
    logits[0, 3, 14] = 5
    assert greedy_accept(tree, logits, max_depth=3).paths == [[0]]


# A pool for top_k 2, frontier 1, depth 3 (TreeLayout): level 1 = the root's children a, b
# (columns 0, 1); depth 2 feeds a (temp slot 0), level 2 = a's children c, d (columns 2, 3);
# depth 3 feeds c (temp slot 1), level 3 = c's children e, f (columns 4, 5).
POOL_TOKENS = torch.tensor([[10, 11, 12, 13, 14, 15]])
LOW = torch.finfo(torch.float32).min
POOL_MASKS = torch.tensor([[[LOW, LOW], [LOW, LOW], [0, LOW], [0, LOW], [0, 0], [0, 0]]])   # temp slots seen
POOL_FRONTS = torch.tensor([[0, 0]])     # level-local column fed at depths 2 and 3: a, then c


def layout():
    return TreeLayout.build(top_k=2, frontier=1, depth=3, vocab=100, dtype=torch.float32, device="cpu")


def test_layout_shape():
    lay = layout()
    assert lay.widths == (2, 2, 2) and lay.fronts == (1, 1) and lay.candidates == 6 and lay.slots == 2
    assert lay.depth_of.tolist() == [1, 1, 2, 2, 3, 3]
    assert lay.parent_slot.tolist() == [ROOT, ROOT, 0, 0, 1, 1]
    assert lay.chain_bias.nonzero().squeeze(-1).tolist() == [0, 2, 4]      # column 0 of every level


def test_prune_keeps_chain_then_best_nodes_with_their_ancestors():
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.5, 0.1, 0.45, 0.05]]))
    tree = prune_tree(layout(), POOL_TOKENS, scores, POOL_MASKS, POOL_FRONTS, max_nodes=4)
    assert tree.tokens[0].tolist() == [10, 11, 12, 14]        # chain a, c, e, then b; in pool (depth) order
    assert tree.parents[0].tolist() == [ROOT, ROOT, 0, 2]
    assert tree.depths[0].tolist() == [1, 1, 2, 3]
    assert torch.equal(tree.ancestors, ancestors_of([ROOT, ROOT, 0, 2]))
    assert tree.rank[0].tolist() == [0, 3, 1, 2] and tree.valid.all()


def test_prune_tie_keeps_parent_before_child():
    # a child with exactly its parent's score (probability 1.0) must not displace the parent
    scores = torch.tensor([[-1.0, -3.0, -3.0, -4.0, -3.0, -5.0]])
    lay = layout()
    lay.chain_bias.zero_()                      # rank by score alone: ties decide
    tree = prune_tree(lay, POOL_TOKENS, scores, POOL_MASKS, POOL_FRONTS, max_nodes=3)
    assert tree.tokens[0].tolist() == [10, 11, 12]    # b (depth 1) before c and e of the same score


def test_prune_keeps_a_fixed_node_count_with_invalid_nodes_masked():
    scores = torch.tensor([[-0.1, -2.0, NEG_INF, NEG_INF, NEG_INF, NEG_INF]])
    tree = prune_tree(layout(), POOL_TOKENS, scores, POOL_MASKS, POOL_FRONTS, max_nodes=5)
    assert tree.tokens.shape == (1, 5) and tree.valid[0].tolist() == [True, True, False, False, False]
    assert tree.num_nodes.tolist() == [2]
    # every node, valid or not, sees itself (no empty attention row in the verify)
    assert tree.ancestors[0].diagonal().all()


@pytest.mark.parametrize("seed", range(6))
def test_drafted_trees_are_trees(seed):
    """Trees the drafter grows on a real (tiny) draft: every valid node's parent is a kept valid
    node one depth up, `ancestors` is the closure of `parents`, ranks are distinct."""
    from decoding import SpeculativeDecoder
    from tests.decoding.test_greedy_lossless import draft_model, target_model
    from tests.helpers import random_batch

    rng = random.Random(seed)
    target = target_model("llama", "default", seed % 4)
    draft = draft_model(["perturbed", "random"][seed % 2], "llama", "default", seed % 4)
    cfg = TreeConfig(top_k=rng.randint(1, 4), frontier=rng.randint(1, 4), max_depth=rng.randint(1, 5),
                     max_nodes=rng.randint(1, 30), threshold=rng.choice([0.0, 0.1]))
    decoder = SpeculativeDecoder(target, draft, cfg)
    trees = []
    decoder.step_observer = lambda tree, acc: trees.append(tree)
    decoder.generate(*random_batch(target, 3, seed=seed), max_new_tokens=8, eos_token_id=[])
    assert trees
    for tree in trees:
        B, N = tree.tokens.shape
        assert N <= cfg.max_nodes
        if N == 0:          # the last token of a row: no drafting
            continue
        for b in range(B):
            parents, depths, valid = tree.parents[b].tolist(), tree.depths[b].tolist(), tree.valid[b].tolist()
            assert sorted(tree.rank[b].tolist()) == sorted(set(tree.rank[b].tolist()))
            for i in range(N):
                if not valid[i]:
                    continue
                p = parents[i]
                assert (depths[i] == 1) == (p == ROOT)
                if p != ROOT:
                    assert p < i and valid[p] and depths[p] == depths[i] - 1
            closure = ancestors_of(parents)[0]
            for i in range(N):
                if valid[i]:
                    assert tree.ancestors[b, i].tolist() == closure[i].tolist()


@pytest.mark.parametrize("kwargs", [dict(top_k=0), dict(frontier=-1), dict(max_depth=1.5),
                                    dict(max_nodes=0), dict(threshold=1.0), dict(threshold=-0.1)])
def test_tree_config_validation(kwargs):
    with pytest.raises(ValueError, match="TreeConfig"):
        TreeConfig(**kwargs)


def test_tree_config_defaults_valid():
    cfg = TreeConfig()
    assert cfg.max_candidates >= cfg.max_nodes
    assert math.isfinite(cfg.threshold)
