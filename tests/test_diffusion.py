"""The masked-diffusion objective."""

import math

import torch

from mmdlm.diffusion import first_token_loss, masked_diffusion_loss, next_token_loss, sample_masks


def test_only_masked_maskable_positions_contribute():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (4, 16))
    maskable = torch.zeros(4, 16, dtype=torch.bool)
    maskable[:, 8:] = True
    seen = {}

    def logits_fn(noisy):
        seen["noisy"] = noisy
        logits = torch.zeros(*noisy.shape, 10, requires_grad=True)
        seen["logits"] = logits
        return logits

    out = masked_diffusion_loss(logits_fn, ids, maskable, mask_id=10)
    out.loss.backward()
    masked = seen["noisy"] == 10
    assert not masked[:, :8].any()  # prompt never masked
    grad_rows = seen["logits"].grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, masked)  # gradient exactly where tokens were masked
    assert out.num_masked == int(masked.sum())


def test_expectation_matches_analytic_value():
    """Context-free predictor q: E[loss] = mean over maskable tokens of -log q(x), for every t law."""
    torch.manual_seed(1)
    V, L, B = 5, 6, 40000
    q_logits = torch.randn(V)
    ids = torch.randint(0, V, (1, L)).repeat(B, 1)
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, :2] = False
    analytic = (-torch.log_softmax(q_logits, 0)[ids[0, 2:]]).mean().item()
    for complementary, schedule in [(False, "ratio"), (True, "ratio"), (False, "count")]:
        out = masked_diffusion_loss(
            lambda noisy: q_logits.expand(*noisy.shape, V), ids, maskable, mask_id=V,
            eps=0.05, complementary=complementary, schedule=schedule,
        )
        assert math.isclose(out.loss.item(), analytic, rel_tol=0.02), (schedule, out.loss.item(), analytic)


def test_complementary_masks_partition_the_maskable_tokens():
    maskable = torch.rand(8, 20) > 0.3
    masks, t = sample_masks(maskable, 1e-3, complementary=True, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (2, 8, 20)
    assert not (masks[0] & masks[1]).any()
    assert torch.equal(masks[0] | masks[1], maskable)
    assert torch.all((t > 0) & (t <= 1))


def test_rows_without_maskable_tokens_give_finite_loss():
    ids = torch.randint(0, 10, (3, 8))
    maskable = torch.zeros(3, 8, dtype=torch.bool)
    maskable[1, 4:] = True
    out = masked_diffusion_loss(lambda n: torch.zeros(*n.shape, 10), ids, maskable, mask_id=10)
    assert torch.isfinite(out.loss) and out.per_sequence[0] == 0 and out.per_sequence[2] == 0
    none = masked_diffusion_loss(lambda n: torch.zeros(*n.shape, 10), ids, maskable & False, mask_id=10)
    assert none.loss.item() == 0.0 and none.num_masked == 0


def test_seeded_generator_makes_the_loss_reproducible():
    ids = torch.randint(0, 10, (4, 12))
    maskable = torch.ones(4, 12, dtype=torch.bool)
    logits = torch.randn(4, 12, 11)
    a = masked_diffusion_loss(lambda n: logits, ids, maskable, 10, generator=torch.Generator().manual_seed(3))
    b = masked_diffusion_loss(lambda n: logits, ids, maskable, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)


def test_next_token_loss_scores_only_maskable_targets():
    ids = torch.tensor([[1, 2, 3, 4]])
    maskable = torch.tensor([[False, False, True, True]])
    logits = torch.zeros(1, 4, 6)
    logits[0, 1, 3] = 5.0  # predicts token 3 at position 2: right
    logits[0, 2, 0] = 5.0  # predicts token 0 at position 3: wrong (target 4)
    expected = (torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 4])))
    torch.testing.assert_close(next_token_loss(logits, ids, maskable), expected)


def test_next_token_loss_of_shifted_logits_is_the_same_loss():
    torch.manual_seed(0)
    ids, logits = torch.randint(0, 6, (3, 5)), torch.randn(3, 5, 6)
    maskable = torch.rand(3, 5) > 0.3
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # what a shift_logits model returns
    torch.testing.assert_close(next_token_loss(shifted, ids, maskable, shifted=True),
                               next_token_loss(logits, ids, maskable))


def test_first_token_loss_scores_each_rows_first_answer_token_where_the_logits_put_it():
    ids = torch.tensor([[1, 2, 3, 4], [1, 5, 2, 2], [1, 2, 3, 3]])
    prompt_length = torch.tensor([2, 3, 4])  # the last row has no answer token: not scored
    logits = torch.randn(3, 4, 6)
    expected = torch.nn.functional.cross_entropy(logits[[0, 1], [2, 3]], torch.tensor([3, 2]))
    torch.testing.assert_close(first_token_loss(logits, ids, prompt_length), expected)
    assert first_token_loss(logits, ids, torch.tensor([4, 4, 4])) == 0


def test_count_schedule_masks_one_to_all_and_scores_the_mean_of_the_masked():
    """LLaDA's eq. 6: l ~ U{1..L} masked, weight L/l; over L that is the masked tokens' mean cross-entropy."""
    torch.manual_seed(2)
    B, L, V = 4000, 7, 9
    maskable = torch.rand(B, L) > 0.4
    maskable[:, 0] = True  # every row has at least one maskable token
    masks, t = sample_masks(maskable, 1e-3, False, torch.Generator().manual_seed(0), schedule="count")
    counts, totals = masks[0].sum(1), maskable.sum(1)
    assert not (masks[0] & ~maskable).any()
    assert torch.all((counts >= 1) & (counts <= totals))
    torch.testing.assert_close(t[0], counts / totals)
    full = totals == 3  # l is uniform on {1, 2, 3} for rows with three maskable tokens
    shares = torch.bincount(counts[full], minlength=4)[1:].float() / full.sum()
    assert torch.all((shares - 1 / 3).abs() < 0.05), shares
    ids = torch.randint(0, V, (B, L))
    logits = torch.randn(B, L, V)
    out = masked_diffusion_loss(lambda n: logits, ids, maskable, V, generator=torch.Generator().manual_seed(0),
                                schedule="count")
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # [B, L]
    mean_masked = (token * masks[0]).sum(1) / counts
    torch.testing.assert_close(out.per_sequence, mean_masked)
