"""mmdet 3.x: a small FCOS (random-init ResNet-18, FPN of width 64 on strides 4-32) for a difffeat COCO folder.

experiments/mmdet_train.py fills in the folders (train_roots, test_root), the classes (metainfo.classes from
the json, in category-id order) and num_classes, then trains and tests with mmdet's runner and CocoMetric:
  python -m experiments.mmdet_train --train DIR [DIR ...] --test DIR --work-dir DIR
Sizes follow heads/detectors.py (the torchvision FCOS it is compared with): no resizing of the 64-px
images, FCOS regress ranges [0, 32), [32, 64), [64, 128), [128, inf) (torchvision's [4s, 8s] at strides
4, 8, 16, 32), AdamW 1e-3 with warm-up and cosine decay over a fixed number of iterations.
"""
default_scope = 'mmdet'

num_classes = 5  # replaced from the json
max_iters = 2000
batch_size = 8
image_size = 64
train_roots = ['data/train']  # replaced: difffeat COCO folders (annotations.json + images/)
test_root = 'data/test'  # replaced

model = dict(
    type='FCOS',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[127.5, 127.5, 127.5], std=[63.75, 63.75, 63.75],
                           bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='ResNet', depth=18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
                  out_indices=(0, 1, 2), frozen_stages=-1,
                  norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, style='pytorch', init_cfg=None),
    neck=dict(type='FPN', in_channels=[64, 128, 256], out_channels=64, start_level=0, add_extra_convs='on_output',
              num_outs=4, relu_before_extra_convs=True),
    bbox_head=dict(
        type='FCOSHead', num_classes=num_classes, in_channels=64, stacked_convs=2, feat_channels=64,
        strides=[4, 8, 16, 32], regress_ranges=((-1, 32), (32, 64), (64, 128), (128, 1e8)),
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='IoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.6),
                  max_per_img=100))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),  # a no-op that records scale_factor
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),  # a no-op that records scale_factor
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def _coco(root, pipeline, test_mode=False):
    return dict(type='CocoDataset', data_root=root, ann_file='annotations.json', data_prefix=dict(img='images/'),
                filter_cfg=dict(filter_empty_gt=False, min_size=0), pipeline=pipeline, test_mode=test_mode,
                metainfo=dict(classes=()))


train_dataloader = dict(
    batch_size=batch_size, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ConcatDataset', datasets=[_coco(r, train_pipeline) for r in train_roots]))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=_coco(test_root, test_pipeline, test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=test_root + '/annotations.json', metric='bbox', format_only=False)
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters + 1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4), clip_grad=dict(max_norm=10))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=100, end=max_iters, T_max=max_iters - 100),
]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=max_iters, by_epoch=False, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
log_level = 'WARNING'
randomness = dict(seed=0, deterministic=False)
load_from = None
resume = False
