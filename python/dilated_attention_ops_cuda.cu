#include <dilated_attention/torch_registration.hpp>
