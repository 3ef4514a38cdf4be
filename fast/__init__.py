"""The GPU fast paths: where the teaching code would branch for speed, it hands over here instead.

Each module is behind one seam, and the code before the seam reads the same without it:
  attention  model.attend hands a half-precision GPU chunk after a prefix to cuDNN (two blocks
             merged by log-sum-exp)
  compiled   fuse(model): each layer's pre and post compiled (torch.compile), and with graphs=True
             the forward handed to segments (--fuse, --graphs)
  decode     generate.decode hands decoding on a GPU to static steps replayed as CUDA graphs
  segments   a forward recorded and replayed as CUDA graphs of what lies between two K/V exchanges
  table      partition.CostModel.chunk_time on a GPU: the chunk times calibrate.py measured, interpolated
  staged     StagedTransport: GPU tensors through pinned host memory when the MPI is not CUDA-aware
             (program.setup picks it); transport.Transport is the interface
"""
