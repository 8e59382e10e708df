# Helpers for aligner's build: locate the installed torch through Python,
# choose CUDA architectures, locate CUTLASS, and keep ptxas reports.

# Queries the Python interpreter for facts about the installed torch.
# Sets TORCH_VERSION, TORCH_CUDA_VERSION ("" for a CPU build), TORCH_INCLUDE_DIRS,
# TORCH_LIB_DIR, TORCH_CXX11_ABI, TORCH_SITE_PACKAGES.
function(aligner_query_torch)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
"import os, torch, torch.utils.cpp_extension as ce
print(torch.__version__.split('+')[0])
print(torch.version.cuda or '')
print('|'.join(ce.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(os.path.dirname(os.path.dirname(torch.__file__)))"
    OUTPUT_VARIABLE _out
    RESULT_VARIABLE _rc
    ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "aligner: cannot import torch with ${Python_EXECUTABLE}:\n${_err}\n"
                        "Install it first: pip install torch==2.14.1")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  list(GET _lines 0 _version)
  list(GET _lines 1 _cuda)
  list(GET _lines 2 _incs)
  list(GET _lines 3 _libdir)
  list(GET _lines 4 _abi)
  list(GET _lines 5 _site)
  string(REPLACE "|" ";" _incs "${_incs}")
  set(TORCH_VERSION "${_version}" PARENT_SCOPE)
  set(TORCH_CUDA_VERSION "${_cuda}" PARENT_SCOPE)
  set(TORCH_INCLUDE_DIRS "${_incs}" PARENT_SCOPE)
  set(TORCH_LIB_DIR "${_libdir}" PARENT_SCOPE)
  set(TORCH_CXX11_ABI "${_abi}" PARENT_SCOPE)
  set(TORCH_SITE_PACKAGES "${_site}" PARENT_SCOPE)
endfunction()

# Architectures to compile for, as CMAKE_CUDA_ARCHITECTURES entries:
# the visible GPUs' capabilities; else TORCH_CUDA_ARCH_LIST ("8.0;9.0",
# "8.0 9.0+PTX"); else 8.0 and 9.0. "+PTX" also embeds PTX for that arch.
function(aligner_select_cuda_archs out_var out_source)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
"import torch
if torch.cuda.is_available():
    caps = sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    print(';'.join(caps))"
    OUTPUT_VARIABLE _visible OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_visible)
    set(_list "${_visible}")
    set(_source "visible GPUs")
  elseif(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    string(REPLACE " " ";" _list "$ENV{TORCH_CUDA_ARCH_LIST}")
    set(_source "TORCH_CUDA_ARCH_LIST")
  else()
    set(_list "8.0;9.0")
    set(_source "default")
  endif()
  set(_archs "")
  foreach(_arch IN LISTS _list)
    if(_arch STREQUAL "")
      continue()
    endif()
    set(_ptx OFF)
    if(_arch MATCHES "\\+PTX$")
      set(_ptx ON)
      string(REPLACE "+PTX" "" _arch "${_arch}")
    endif()
    if(NOT _arch MATCHES "^[0-9]+\\.[0-9]+a?$")
      message(FATAL_ERROR "aligner: cannot parse CUDA arch '${_arch}' (from ${_source}); "
                          "use entries like 8.0, 9.0 or 9.0+PTX")
    endif()
    string(REPLACE "." "" _num "${_arch}")
    list(APPEND _archs "${_num}-real")
    if(_ptx)
      list(APPEND _archs "${_num}-virtual")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES _archs)
  set(${out_var} "${_archs}" PARENT_SCOPE)
  set(${out_source} "${_source}" PARENT_SCOPE)
endfunction()

# CUTLASS/CuTe headers from the nvidia-cutlass wheel (CUTLASS_INCLUDE_DIR
# overrides). Sets CUTLASS_INCLUDE_DIR and CUTLASS_VERSION ("" if absent).
function(aligner_find_cutlass)
  if(NOT CUTLASS_INCLUDE_DIR)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import os, cutlass_library; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
      OUTPUT_VARIABLE CUTLASS_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  set(_version "")
  if(CUTLASS_INCLUDE_DIR AND EXISTS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h")
    file(STRINGS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h" _defs REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
    foreach(_part MAJOR MINOR PATCH)
      string(REGEX MATCH "CUTLASS_${_part} ([0-9]+)" _m "${_defs}")
      set(_v_${_part} "${CMAKE_MATCH_1}")
    endforeach()
    set(_version "${_v_MAJOR}.${_v_MINOR}.${_v_PATCH}")
  else()
    set(CUTLASS_INCLUDE_DIR "")
  endif()
  set(CUTLASS_INCLUDE_DIR "${CUTLASS_INCLUDE_DIR}" PARENT_SCOPE)
  set(CUTLASS_VERSION "${_version}" PARENT_SCOPE)
endfunction()
