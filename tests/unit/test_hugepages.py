"""A CPU model's weights moved into one mapping advised for transparent huge pages."""

from __future__ import annotations

import mmap

import pytest
import torch
from text_generation_server.utils.hugepages import ALIGN, HUGE_PAGE, move_to_huge_pages, thp_mode


def test_the_mode_is_the_bracketed_word_of_the_kernels_setting(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert thp_mode(setting) == "madvise"
    setting.write_text("[never]\n")
    assert thp_mode(setting) == "never"
    assert thp_mode(tmp_path / "missing").startswith("unavailable")


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 48).to(torch.bfloat16)
        self.proj = torch.nn.Linear(48, 37, bias=True)
        self.head = torch.nn.Linear(48, 100, bias=False).to(torch.bfloat16)
        self.head.weight = self.embed.weight  # tied: one parameter, two owners


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")
def test_parameters_move_into_one_aligned_mapping_with_their_values():
    torch.manual_seed(0)
    module = Tied()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    x = torch.randint(0, 100, (5,))
    expected = module.head(module.embed(x)).float()
    said = move_to_huge_pages(module, mode="madvise")
    assert "MiB of weights in transparent huge pages (mode madvise)" in said
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.data_ptr() % ALIGN == 0, name
    assert module.head.weight is module.embed.weight  # moved once, still shared
    ptrs = sorted(p.data_ptr() for p in module.parameters())
    assert ptrs[0] % HUGE_PAGE == 0  # the first tensor starts the mapping's first whole huge page
    assert ptrs[-1] - ptrs[0] < HUGE_PAGE  # all in the one mapping
    torch.testing.assert_close(module.head(module.embed(x)).float(), expected, rtol=0, atol=0)


def test_nothing_moves_where_the_kernel_gives_no_huge_pages():
    module = Tied()
    ptrs = [p.data_ptr() for p in module.parameters()]
    assert move_to_huge_pages(module, mode="never") == "weights in ordinary pages (transparent huge pages: never)"
    assert [p.data_ptr() for p in module.parameters()] == ptrs
