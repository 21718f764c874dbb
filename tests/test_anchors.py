"""model/anchor_utils.py: FPN and C4 anchors against torchvision's AnchorGenerator, and their (row, column,
anchor) order."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from model import box_coder
from model.anchor_utils import ANCHOR_SIZES, ASPECT_RATIOS, anchor_strides, cell_anchors, grid_anchors
from model.backbone import FPN_STRIDES
from model.c4 import C4_ANCHORS
from model.rpn import RegionProposalNetwork

HEIGHT, WIDTH = 256, 320  # multiples of 64: torchvision's derived strides equal the nominal ones


def _torchvision_anchors_per_level() -> list[torch.Tensor]:
    generator = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    images = ImageList(torch.zeros(2, 3, HEIGHT, WIDTH), [(HEIGHT, WIDTH), (200, 310)])
    features = [torch.zeros(2, 1, HEIGHT // s, WIDTH // s) for s in FPN_STRIDES]
    anchors = generator(images, features)
    assert torch.equal(anchors[0], anchors[1])
    counts = [f.shape[-2] * f.shape[-1] * len(ASPECT_RATIOS) for f in features]
    return list(anchors[0].split(counts))


def test_cell_anchors_match_torchvision():
    generator = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    for size, reference in zip(ANCHOR_SIZES, generator.cell_anchors, strict=True):
        assert torch.equal(cell_anchors(size), reference)


def test_cell_anchors_hand_computed():
    # size 32: ratio 0.5 -> w 32 * sqrt 2 = 45.25, h 22.63 -> half sides rounded 23, 11; ratio 1 -> 16, 16;
    # ratio 2 -> 11, 23.
    expected = [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    assert cell_anchors(32).tolist() == expected


def test_grid_anchors_match_torchvision_per_level():
    reference = _torchvision_anchors_per_level()
    for level, (stride, size) in enumerate(zip(FPN_STRIDES, ANCHOR_SIZES, strict=True)):
        ours = grid_anchors(HEIGHT // stride, WIDTH // stride, torch.tensor([[stride, stride]]), cell_anchors(size))
        assert torch.equal(ours[0], reference[level]), f"P{level + 2}"


@pytest.mark.parametrize("size", [(800, 1066), (800, 800), (480, 640), (200, 330), (64, 96)])
def test_each_image_alone_gets_torchvisions_anchors(size):
    """torchvision's strides are padded size // feature size: for an image padded to 800 rows (the standard
    COCO input: 480 x 640 resized to 800 x 1066, padded to 800 x 1088) P6 anchors are 61 px apart in height.
    Our anchors for an image are those torchvision gives it alone, on every level."""
    padded = [-(-side // 32) * 32 for side in size]
    generator = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    maps = [(-(-padded[0] // s), -(-padded[1] // s)) for s in FPN_STRIDES]  # ceil: the stride-2 convolutions
    reference = generator(ImageList(torch.zeros(1, 3, *padded), [size]), [torch.zeros(1, 1, *m) for m in maps])[0]
    image_sizes = torch.tensor([size])
    ours = [
        grid_anchors(*m, anchor_strides(image_sizes, s), cell_anchors(a))
        for m, s, a in zip(maps, FPN_STRIDES, ANCHOR_SIZES, strict=True)
    ]
    assert torch.equal(torch.cat(ours, 1)[0], reference)
    if padded[0] == 800:
        assert anchor_strides(image_sizes, 64)[0, 0] == 61


def test_anchor_strides_follow_each_images_own_padded_size():
    """In a batch padded to 832 rows, an image of 800 rows keeps its own P6 stride (800 // 13 = 61), not the
    batch's (832 // 13 = 64): its anchors do not depend on what it is batched with."""
    sizes = torch.tensor([[800, 1066], [832, 1248], [790, 1333]])
    assert anchor_strides(sizes, 64).tolist() == [[61, 64], [64, 62], [61, 64]]
    for stride in FPN_STRIDES[:4]:
        assert (anchor_strides(sizes, stride) == stride).all()


def test_grid_anchors_are_ordered_row_column_anchor():
    cells = cell_anchors(64)
    anchors = grid_anchors(3, 5, torch.tensor([[8, 8], [7, 9]]), cells).view(2, 3, 5, 3, 4)
    for row, col, a in [(0, 0, 0), (2, 4, 1), (1, 3, 2), (2, 0, 0)]:
        shift = torch.tensor([col * 8.0, row * 8.0, col * 8.0, row * 8.0])
        assert torch.equal(anchors[0, row, col, a], cells[a] + shift)
        shift = torch.tensor([col * 9.0, row * 7.0, col * 9.0, row * 7.0])  # each image its own strides
        assert torch.equal(anchors[1, row, col, a], cells[a] + shift)


def test_anchors_do_not_depend_on_padding():
    """A larger (more padded) map's anchors start with the smaller map's, row by row."""
    cells = cell_anchors(128)
    strides = torch.tensor([[16, 16]])
    small = grid_anchors(4, 6, strides, cells).view(4, 6, 3, 4)
    large = grid_anchors(7, 9, strides, cells).view(7, 9, 3, 4)
    assert torch.equal(large[:4, :6], small)


def _one_hot_rpn(level: int, row: int, col: int, anchor: int) -> tuple[RegionProposalNetwork, list[torch.Tensor]]:
    """An RPN over 1-channel features that are 1 at one position of one level and 0 elsewhere. Its head
    scores ``anchor`` highest there and moves that anchor right by half its width (dx = 0.5)."""
    rpn = RegionProposalNetwork(1, pre_nms_top_n={"testing": 50}, post_nms_top_n={"testing": 10}).eval()
    head = rpn.head
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()
        head.conv[0][0].weight[0, 0, 1, 1] = 1.0  # identity 3x3 convolution
        head.cls_logits.weight[anchor, 0] = 5.0
        head.bbox_pred.weight[4 * anchor, 0] = 0.5
    features = [torch.zeros(1, 1, HEIGHT // s, WIDTH // s) for s in FPN_STRIDES]
    features[level][0, 0, row, col] = 1.0
    return rpn, features


@pytest.mark.parametrize("level,row,col,anchor", [(0, 30, 41, 2), (2, 5, 7, 0), (3, 4, 2, 1)])
def test_rpn_outputs_follow_the_anchor_order(level, row, col, anchor):
    rpn, features = _one_hot_rpn(level, row, col, anchor)
    with torch.no_grad():
        proposals, valid, _ = rpn(features, torch.tensor([[HEIGHT, WIDTH]]))
    stride = FPN_STRIDES[level]
    strides = torch.tensor([[stride, stride]])
    anchors = grid_anchors(HEIGHT // stride, WIDTH // stride, strides, cell_anchors(ANCHOR_SIZES[level]))
    target = anchors.view(HEIGHT // stride, WIDTH // stride, 3, 4)[row, col, anchor]
    expected = box_coder.decode(torch.tensor([[0.5, 0.0, 0.0, 0.0]]), target[None], (1.0, 1.0, 1.0, 1.0))
    expected = box_coder.clip_to_size(expected[:, 0][None], torch.tensor([[HEIGHT, WIDTH]]))[0, 0]
    assert valid[0, 0]
    torch.testing.assert_close(proposals[0, 0], expected)



def test_c4_anchors_match_torchvision():
    """The C4 head's one level: all 5 sizes x 3 ratios at stride 16 (15 per location), in the order
    torchvision's AnchorGenerator gives for sizes ((32, ..., 512),)."""
    generator = AnchorGenerator((ANCHOR_SIZES,), (ASPECT_RATIOS,))
    assert torch.equal(cell_anchors(ANCHOR_SIZES), generator.cell_anchors[0]) and len(generator.cell_anchors[0]) == 15
    (stride, sizes), = C4_ANCHORS
    size = (200, 310)
    padded = [-(-side // 32) * 32 for side in size]
    grid = (-(-padded[0] // stride), -(-padded[1] // stride))
    reference = generator(ImageList(torch.zeros(1, 3, *padded), [size]), [torch.zeros(1, 1, *grid)])[0]
    ours = grid_anchors(*grid, anchor_strides(torch.tensor([size]), stride), cell_anchors(sizes))
    assert stride == 16 and torch.equal(ours[0], reference)
