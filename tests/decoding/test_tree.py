"""Unit tests of tree building, masks and positions on hand-made trees."""
import math

import pytest
import torch

from decoding.tree import (
    DraftTree, TreeConfig, ancestor_matrix, expand_children, prune_tree, select_frontier,
    verify_positions, verify_visibility,
)
from decoding.verify import greedy_accept

# Hand-made tree for one row (node: token, parent):
#   root ─ 0:a(10) ─ 2:c(12) ─ 4:e(14)
#        └ 1:b(11) └ 3:d(13)
TOKENS = torch.tensor([[10, 11, 12, 13, 14]])
PARENTS = torch.tensor([[-1, -1, 0, 0, 2]])
DEPTHS = torch.tensor([[1, 1, 2, 2, 3]])
VALID = torch.ones(1, 5, dtype=torch.bool)


def hand_tree(scores=None) -> DraftTree:
    scores = scores if scores is not None else torch.log(torch.tensor([[0.6, 0.3, 0.4, 0.15, 0.3]]))
    return DraftTree(tokens=TOKENS, parents=PARENTS, depths=DEPTHS, scores=scores, valid=VALID,
                     ancestors=ancestor_matrix(PARENTS, VALID, max_depth=3))


def test_ancestor_matrix_hand_tree():
    anc = ancestor_matrix(PARENTS, VALID, max_depth=3)[0]
    expected = {0: {0}, 1: {1}, 2: {0, 2}, 3: {0, 3}, 4: {0, 2, 4}}
    for i, ancestors in expected.items():
        assert set(torch.nonzero(anc[i]).squeeze(-1).tolist()) == ancestors


def test_ancestor_matrix_padding_sees_nothing():
    parents = torch.tensor([[-1, 0, -1]])
    valid = torch.tensor([[True, True, False]])
    anc = ancestor_matrix(parents, valid, max_depth=2)[0]
    assert not anc[2].any()
    assert anc[1].tolist() == [True, True, False]


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


def test_verify_visibility_padding_sees_only_itself():
    tree = hand_tree()
    tree.valid = torch.tensor([[True, True, True, True, False]])
    tree.ancestors = ancestor_matrix(tree.parents, tree.valid, 3)
    vis = verify_visibility(tree)[0]
    assert vis[5].tolist() == [False, False, False, False, False, True]


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


def test_expand_children_scores_and_chain():
    lp = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]]))   # [B=1, F=2, V=3]
    c = expand_children(
        torch.tensor([[4, 7]]), torch.log(torch.tensor([[0.5, 0.25]])), torch.tensor([[True, True]]),
        torch.tensor([[True, False]]), lp, top_k=2)
    tok, par, score, valid, chain = c.tokens, c.parents, c.scores, c.valid, c.chain
    assert tok.tolist() == [[0, 1, 2, 0]] or tok.tolist() == [[0, 1, 2, 1]]
    assert par.tolist() == [[4, 4, 7, 7]]
    assert torch.allclose(score.exp(), torch.tensor([[0.25, 0.15, 0.2, 0.025]]))
    assert chain.tolist() == [[True, False, False, False]]
    assert valid.all()


def test_select_frontier_keeps_chain_node():
    scores = torch.log(torch.tensor([[0.1, 0.5, 0.4, 0.3]]))
    chain = torch.tensor([[True, False, False, False]])
    index, valid = select_frontier(scores, torch.ones(1, 4, dtype=torch.bool), chain, width=2)
    assert set(index[0].tolist()) == {0, 1} and valid.all()


def test_prune_keeps_ancestors_and_best_nodes():
    # candidate order lists parents first; node 4 (deep, high score) keeps 2 and 0
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.5, 0.1, 0.45]]))
    chain = torch.zeros(1, 5, dtype=torch.bool)
    tree = prune_tree(TOKENS, PARENTS, DEPTHS, scores, VALID, chain, max_nodes=3, max_depth=3)
    assert sorted(tree.tokens[0].tolist()) == [10, 12, 14]
    # parents re-indexed into the kept set, sorted by depth
    assert tree.tokens[0].tolist() == [10, 12, 14]
    assert tree.parents[0].tolist() == [-1, 0, 1]
    assert tree.depths[0].tolist() == [1, 2, 3]


def test_prune_tie_keeps_parent_before_child():
    # a child with exactly its parent's score (probability 1.0) must not displace the parent
    scores = torch.tensor([[-1.0, -3.0, -1.0, -4.0, -1.0]])
    chain = torch.zeros(1, 5, dtype=torch.bool)
    tree = prune_tree(TOKENS, PARENTS, DEPTHS, scores, VALID, chain, max_nodes=2, max_depth=3)
    assert tree.tokens[0].tolist() == [10, 12]


def test_prune_pads_rows_with_fewer_candidates():
    tokens = torch.tensor([[10, 11, 12], [20, 21, 22]])
    parents = torch.tensor([[-1, -1, 0], [-1, -1, -1]])
    depths = torch.tensor([[1, 1, 2], [1, 1, 1]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    scores = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.9, 0.05, 0.05]]))
    tree = prune_tree(tokens, parents, depths, scores, valid, torch.zeros_like(valid), 3, 2)
    assert tree.valid[1].tolist() == [True, False, False]
    assert tree.num_nodes.tolist() == [3, 1]


@pytest.mark.parametrize("kwargs", [dict(top_k=0), dict(frontier=-1), dict(max_depth=1.5),
                                    dict(max_nodes=0), dict(threshold=1.0), dict(threshold=-0.1)])
def test_tree_config_validation(kwargs):
    with pytest.raises(ValueError, match="TreeConfig"):
        TreeConfig(**kwargs)


def test_tree_config_defaults_valid():
    cfg = TreeConfig()
    assert cfg.max_candidates >= cfg.max_nodes
    assert math.isfinite(cfg.threshold)
