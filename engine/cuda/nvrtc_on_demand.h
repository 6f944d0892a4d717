// libnvrtc, opened on first use rather than at every process start (nvrtc_on_demand.cc).
#pragma once

namespace da::engine::cuda {

// Opens libnvrtc once (later calls return the first's answer); whether it is open. Called before
// cuDNN is first used: cuDNN's runtime-compiled engines open libnvrtc themselves, by its soname
// and along their own search path, and find it already loaded when this has run, as they did
// when every binary linked it. From our code, the executable's RUNPATH (the toolkit's folder in
// a build tree) is searched too, which cuDNN's own search would not.
bool LoadNvrtc();

}  // namespace da::engine::cuda
