# ruff: noqa: C408  (mmdet configs are written as dict(...))
"""RPN and FCN mask heads with involution (the published "involution heads") or C-volution.

- `InvolutionRPNHead`: the shared 3x3 conv of mmdet's `RPNHead` becomes one 7x7 involution (ReLU after,
  as in `RPNHead.forward_single`); the 1x1 cls/reg convs are unchanged. Needs feat_channels == in_channels.
- `InvolutionFCNMaskHead`: each of the `num_convs` 3x3 ConvModules becomes involution + ReLU; the
  deconv upsample and the 1x1 logits stay. Needs conv_out_channels == in_channels.
`CvolutionRPNHead` / `CvolutionFCNMaskHead` are the same with C-volution.
"""
from __future__ import annotations

from mmdet.models.dense_heads import RPNHead
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from torch import nn

from workloads.mmlab.ops_factory import make_op


class InvolutionRPNHead(RPNHead):
    default_op = "involution"

    def __init__(self, in_channels: int, *args, op: str | None = None, op_kernel_size: int = 7,
                 op_group_channels: int = 16, op_reduction_ratio: int = 4, op_channel_groups: int = 16,
                 **kwargs):
        # RPNHead.__init__ calls _init_layers, so the op settings must exist before it.
        self._op_cfg = dict(op=op or self.default_op, kernel_size=op_kernel_size,
                            group_channels=op_group_channels, reduction_ratio=op_reduction_ratio,
                            channel_groups=op_channel_groups)
        feat = kwargs.get("feat_channels", 256)
        if feat != in_channels:
            raise ValueError(f"feat_channels={feat}: an involution RPN head keeps the channel count, "
                             f"so it must equal in_channels={in_channels}")
        if kwargs.get("num_convs", 1) != 1:
            raise ValueError(f"num_convs={kwargs['num_convs']}: the involution RPN head has one shared op")
        super().__init__(in_channels, *args, **kwargs)

    def _init_layers(self) -> None:
        cfg = dict(self._op_cfg)
        self.rpn_conv = make_op(cfg.pop("op"), self.in_channels, **cfg)
        self.rpn_cls = nn.Conv2d(self.feat_channels, self.num_base_priors * self.cls_out_channels, 1)
        self.rpn_reg = nn.Conv2d(self.feat_channels, self.num_base_priors * self.bbox_coder.encode_size, 1)


class CvolutionRPNHead(InvolutionRPNHead):
    default_op = "cvolution"


class InvolutionFCNMaskHead(FCNMaskHead):
    default_op = "involution"

    def __init__(self, *args, op: str | None = None, op_kernel_size: int = 7, op_group_channels: int = 16,
                 op_reduction_ratio: int = 4, op_channel_groups: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_convs > 0 and self.conv_out_channels != self.in_channels:
            raise ValueError(f"conv_out_channels={self.conv_out_channels}: involution keeps the channel "
                             f"count, so it must equal in_channels={self.in_channels}")
        self.op = op or self.default_op
        self.convs = nn.ModuleList(
            nn.Sequential(
                make_op(self.op, self.in_channels, kernel_size=op_kernel_size, group_channels=op_group_channels,
                        reduction_ratio=op_reduction_ratio, channel_groups=op_channel_groups),
                nn.ReLU(inplace=True),
            )
            for _ in range(self.num_convs)
        )


class CvolutionFCNMaskHead(InvolutionFCNMaskHead):
    default_op = "cvolution"
