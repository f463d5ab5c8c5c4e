// Linked instead of the CUDA backend when libna is built without CUDA: the
// same symbols, each one explaining why it cannot run.
#include <stdexcept>

#include "backend.h"

namespace libna::cuda {
namespace {
[[noreturn]] void unavailable(const char* op) {
  throw std::runtime_error(std::string("[") + op +
                           "] got CUDA tensors, but libna was built without CUDA "
                           "(rebuild with a CUDA compiler and LIBNA_CUDA=ON)");
}
}  // namespace

bool compiled() { return false; }
std::vector<std::string> architectures() { return {}; }
void na_forward(const detail::ForwardArgs& a) { unavailable(op_name(a.params).c_str()); }
void na_qk(const detail::QkArgs& a) { unavailable(op_name(a.params, "_qk").c_str()); }
void na_av(const detail::AvArgs& a) { unavailable(op_name(a.params, "_av").c_str()); }
void na_backward(const detail::BackwardArgs& a) {
  unavailable(op_name(a.params, "_backward").c_str());
}
void na_qk_backward(const detail::QkBackwardArgs& a) {
  unavailable(op_name(a.params, "_qk_backward").c_str());
}
void na_av_backward(const detail::AvBackwardArgs& a) {
  unavailable(op_name(a.params, "_av_backward").c_str());
}
void na_additional_forward(const detail::AdditionalArgs& a) {
  unavailable(("na" + std::to_string(a.rank) + "d (additional_keys)").c_str());
}
void na_additional_backward(const detail::AdditionalBackwardArgs& a) {
  unavailable(("na" + std::to_string(a.rank) + "d_backward (additional_keys)").c_str());
}
void merge_attentions(const detail::MergeArgs&) { unavailable("merge_attentions"); }
void merge_attentions_backward(const detail::MergeBackwardArgs&) {
  unavailable("merge_attentions_backward");
}

}  // namespace libna::cuda
