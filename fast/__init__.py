"""The system around the teaching code: GPU fast paths, staging, traces, and the seam to them.

The teaching files reach it through `job.system` (system.py: made by program.setup only when an
option needs it) and through imports inside a function where a GPU asks for them (attention,
decode); the code before each seam reads the same without it:
  system     the seam: the GPU route, --trace, --fuse/--graphs, searched partitions, warm-ups, --save
  attention  model.attend hands a half-precision GPU chunk after a prefix to cuDNN (two blocks
             merged by log-sum-exp)
  compiled   fuse(model): each Llama layer's Q/K/V and gate/up matmuls merged, each layer's pre and
             post compiled (torch.compile), and with graphs=True the forward handed to segments
             (--fuse, --graphs)
  decode     generate.decode hands decoding on a GPU to static steps replayed as CUDA graphs
  segments   a forward recorded and replayed as CUDA graphs of what lies between two K/V exchanges
  table      partition.CostModel.chunk_time on a GPU: the chunk times calibrate.py measured, interpolated
  staged     StagedTransport: GPU tensors through pinned host memory when the MPI is not CUDA-aware
             (system.py picks it); transport.Transport is the interface
  trace      --trace: a rank's timeline, marked by a wrapper around its transport
"""
