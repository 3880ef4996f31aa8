"""Retrieval science on top of the engine.

heads       pooling heads and layers as torch modules that export to ONNX (MAC, SPoC, GeM, R-MAC,
            NetVLAD, PCA-whitening, hash layer)            (needs torch)
metrics     mAP@all / @k, precision@k, recall@N, precision within a Hamming radius, PR curves
baselines   LSH and ITQ hashing on float features
kmeans      k-means for the NetVLAD and regional-VLAD codebooks
regions     selective-search proposals, RoI pooling, regional VLAD   (needs opencv-contrib)
evaluate    running engines over image sets in batches
lowering    kernels for the fused NetVLAD / GeM ops and Sign (imported by cbir_engine.onnx)

Only numpy modules are imported here; import the torch ones by name.
"""
