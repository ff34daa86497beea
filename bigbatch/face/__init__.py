"""Face recognition at huge batch (InsightFace arcface_torch): margin softmax losses
(`losses`), the model-parallel sampled classifier Partial FC (`partial_fc`) and, alongside,
verification on image pairs (`verification`). The iResNet backbones are `bigbatch.models.iresnet`.

Submodules are imported explicitly (`from bigbatch.face import partial_fc`); nothing is imported
here, so that using one does not pull in the others' dependencies.
"""
