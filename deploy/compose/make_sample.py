"""Write the sample clip replica B plays as a live stream: the synthetic scenes the bundled model knows.

Run once by the `sample-media` service of deploy/docker-compose.yml (the streamer image has
everything it needs); a clip that is already there is kept.
"""

import sys
from pathlib import Path

from streamer.training.world import demo_scenes, render_video, write_video

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/var/lib/streamer/media/demo-world.mp4")
if out.is_file():
    print(f"{out}: already there")
    raise SystemExit(0)
scenes = demo_scenes(4)
tmp = out.with_suffix(".tmp.mp4")
# square 128x128 at 15 fps, 6 s a scene, as `streamer demo` renders it
write_video(str(tmp), render_video([(scene, 6.0) for scene in scenes], fps=15, height=128, width=128))
tmp.replace(out)  # atomic: replica B never opens a half-written file
for i, scene in enumerate(scenes):
    print(f"{i * 6:3d}-{(i + 1) * 6:<3d} s  {scene.caption}")
