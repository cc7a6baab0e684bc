// Native hot path of memory_runtime.pools.DeviceBufferPool.
//
// Built on first use by memory_runtime._native (torch.utils.cpp_extension). It holds no state of
// its own beyond references to the pool's Python containers, so the pool's Python methods (the
// reference implementation, and the path for everything rare: new slabs, other streams' memory,
// errors) and this code always see one consistent state.
//
//   RangeAllocator  address-ordered free byte ranges (the same algorithm and methods as the pure
//                   Python ranges.RangeAllocator, which it replaces when the extension is present)
//   LiveMap         data_ptr -> (key, rounded bytes, requested bytes) of live blocks: the subset
//                   of dict's interface the pool uses, without a Python object per block
//   Counters        the counters both paths update (hits, bytes in use / requested, peaks, the
//                   placement end)
//   FastPath        acquire() / release() for the common case: shape a tuple of ints, the current
//                   stream has a fitting free range, the pool lock is free. Anything else is
//                   handed, untouched, to the pool's Python method of the same name.
//   Lock            the pool's lock (a mutex with threading.Lock's interface): the fast path
//                   takes it without a Python call; a blocking acquire releases the GIL first.
//                   If another thread holds it, the fast path goes the Python way and waits there.
//
// Why native: from Python, the one torch call that makes each buffer's tensor (torch.as_strided)
// already costs more than the whole target of an alloc+release; here the tensor is a TensorImpl
// made directly on the slab's storage, and the bookkeeping skips the bytecode.
// tools/bench_memory.py reports both paths and the as_strided cost on the host it runs on.

#include <Python.h>
#include <structmember.h>

#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#ifdef MEMORY_RUNTIME_WITH_CUDA
// CUDA builds read the current stream and device in C++ (from Python each is one more torch call).
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace {

// Must match ranges.REGION_SHIFT: free-range keys are region << REGION_SHIFT | offset.
constexpr int REGION_SHIFT = 48;
constexpr uint64_t OFFSET_MASK = (uint64_t(1) << REGION_SHIFT) - 1;
// Must match ranges.ALIGNMENT / ranges.SUBCLASS_BITS (round_size).
constexpr int64_t ALIGNMENT = 512;
constexpr int SUBCLASS_BITS = 6;
// Shapes with more dimensions take the Python path.
constexpr Py_ssize_t MAX_DIMS = 12;
// Must match checks.MAX_REQUEST_BYTES: larger requests take the Python path, which refuses them.
constexpr int64_t MAX_REQUEST_BYTES = int64_t(1) << 48;

int64_t round_size(int64_t n) {
  if (n <= ALIGNMENT) return ALIGNMENT;
  int bits = 64 - __builtin_clzll(static_cast<uint64_t>(n));
  int64_t step = std::max<int64_t>(ALIGNMENT, int64_t(1) << (bits - 1 - SUBCLASS_BITS));
  return (n + step - 1) / step * step;
}

// tp_new / tp_dealloc of a Python object that owns one heap-allocated C++ member.
template <typename Obj, typename T, T* Obj::*Field>
PyObject* owning_new(PyTypeObject* type, PyObject*, PyObject*) {
  auto* self = reinterpret_cast<Obj*>(type->tp_alloc(type, 0));
  if (!self) return nullptr;
  self->*Field = new (std::nothrow) T();
  if (!(self->*Field)) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  return reinterpret_cast<PyObject*>(self);
}

template <typename Obj, typename T, T* Obj::*Field>
void owning_dealloc(Obj* self) {
  delete (self->*Field);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

// ------------------------------------------------------------------------------ RangeAllocator

struct Ranges {
  std::vector<uint64_t> starts;  // sorted start keys
  std::vector<uint64_t> sizes;
};

struct RangeAllocator {
  PyObject_HEAD
  Ranges* ranges;
  long long free_bytes;
};

// First fit from the bottom (or the top); returns the start key or UINT64_MAX if nothing fits.
uint64_t ra_alloc(RangeAllocator* a, uint64_t size, bool from_top) {
  if (static_cast<long long>(size) > a->free_bytes) return UINT64_MAX;
  auto& starts = a->ranges->starts;
  auto& sizes = a->ranges->sizes;
  const size_t n = sizes.size();
  if (from_top) {
    size_t i = n;
    while (i > 0 && sizes[i - 1] < size) --i;
    if (i == 0) return UINT64_MAX;
    --i;
    uint64_t rest = sizes[i] - size;
    uint64_t start = starts[i];
    if (rest) {
      sizes[i] = rest;
    } else {
      starts.erase(starts.begin() + i);
      sizes.erase(sizes.begin() + i);
    }
    a->free_bytes -= static_cast<long long>(size);
    return start + rest;
  }
  size_t i = 0;
  while (i < n && sizes[i] < size) ++i;
  if (i == n) return UINT64_MAX;
  uint64_t start = starts[i];
  uint64_t rest = sizes[i] - size;
  if (rest) {
    starts[i] = start + size;
    sizes[i] = rest;
  } else {
    starts.erase(starts.begin() + i);
    sizes.erase(sizes.begin() + i);
  }
  a->free_bytes -= static_cast<long long>(size);
  return start;
}

void ra_free(RangeAllocator* a, uint64_t start, uint64_t size) {
  auto& starts = a->ranges->starts;
  auto& sizes = a->ranges->sizes;
  a->free_bytes += static_cast<long long>(size);
  size_t i = std::lower_bound(starts.begin(), starts.end(), start) - starts.begin();
  bool left = i > 0 && starts[i - 1] + sizes[i - 1] == start;
  // Keys of different regions never touch (offsets stay far below 2**REGION_SHIFT), so merging
  // by adjacency never joins two slabs.
  if (i < starts.size() && starts[i] == start + size) {
    if (left) {
      sizes[i - 1] += size + sizes[i];
      starts.erase(starts.begin() + i);
      sizes.erase(sizes.begin() + i);
    } else {
      starts[i] = start;
      sizes[i] += size;
    }
  } else if (left) {
    sizes[i - 1] += size;
  } else {
    starts.insert(starts.begin() + i, start);
    sizes.insert(sizes.begin() + i, size);
  }
}

bool as_u64(PyObject* obj, uint64_t* out, const char* what) {
  if (!PyLong_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be an int, got %.80s", what, Py_TYPE(obj)->tp_name);
    return false;
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(obj);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**64), got %R", what, obj);
    return false;
  }
  *out = v;
  return true;
}

PyObject* RangeAllocator_alloc(RangeAllocator* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  PyObject* size_obj = nargs > 0 ? args[0] : nullptr;
  PyObject* top_obj = nargs > 1 ? args[1] : nullptr;
  Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, k);
    if (PyUnicode_CompareWithASCIIString(name, "from_top") == 0 && !top_obj) {
      top_obj = args[nargs + k];
    } else if (PyUnicode_CompareWithASCIIString(name, "size") == 0 && !size_obj) {
      size_obj = args[nargs + k];
    } else {
      PyErr_Format(PyExc_TypeError, "alloc() got an unexpected keyword argument %R", name);
      return nullptr;
    }
  }
  if (!size_obj || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "alloc(size, from_top=False)");
    return nullptr;
  }
  uint64_t size;
  if (!as_u64(size_obj, &size, "size")) return nullptr;
  int top = top_obj ? PyObject_IsTrue(top_obj) : 0;
  if (top < 0) return nullptr;
  uint64_t key = ra_alloc(self, size, top != 0);
  if (key == UINT64_MAX) Py_RETURN_NONE;
  return PyLong_FromUnsignedLongLong(key);
}

PyObject* RangeAllocator_free(RangeAllocator* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "free(start, size)");
    return nullptr;
  }
  uint64_t start, size;
  if (!as_u64(args[0], &start, "start") || !as_u64(args[1], &size, "size")) return nullptr;
  ra_free(self, start, size);
  Py_RETURN_NONE;
}

PyObject* range_list(RangeAllocator* self) {
  const auto& starts = self->ranges->starts;
  const auto& sizes = self->ranges->sizes;
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(starts.size()));
  if (!out) return nullptr;
  for (size_t i = 0; i < starts.size(); ++i) {
    PyObject* item = Py_BuildValue("(KK)", static_cast<unsigned long long>(starts[i]),
                                   static_cast<unsigned long long>(sizes[i]));
    if (!item) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

PyObject* RangeAllocator_ranges(RangeAllocator* self, PyObject*) { return range_list(self); }

PyObject* RangeAllocator_take_all(RangeAllocator* self, PyObject*) {
  PyObject* out = range_list(self);
  if (!out) return nullptr;
  self->ranges->starts.clear();
  self->ranges->sizes.clear();
  self->free_bytes = 0;
  return out;
}

// Index of the range starting at region's first byte, or -1.
Py_ssize_t region_head(RangeAllocator* self, PyObject* const* args, Py_ssize_t nargs, uint64_t* region_size) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "expected (region, region_size)");
    return -2;
  }
  uint64_t region;
  if (!as_u64(args[0], &region, "region") || !as_u64(args[1], region_size, "region_size")) return -2;
  if (region >= (uint64_t(1) << (64 - REGION_SHIFT))) {
    PyErr_Format(PyExc_ValueError, "region must be < %llu, got %llu",
                 static_cast<unsigned long long>(uint64_t(1) << (64 - REGION_SHIFT)),
                 static_cast<unsigned long long>(region));
    return -2;
  }
  uint64_t key = region << REGION_SHIFT;
  const auto& starts = self->ranges->starts;
  size_t i = std::lower_bound(starts.begin(), starts.end(), key) - starts.begin();
  if (i < starts.size() && starts[i] == key) return static_cast<Py_ssize_t>(i);
  return -1;
}

PyObject* RangeAllocator_whole_region_free(RangeAllocator* self, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t region_size;
  Py_ssize_t i = region_head(self, args, nargs, &region_size);
  if (i == -2) return nullptr;
  return PyBool_FromLong(i >= 0 && self->ranges->sizes[static_cast<size_t>(i)] == region_size);
}

PyObject* RangeAllocator_drop_region(RangeAllocator* self, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t region_size;
  Py_ssize_t i = region_head(self, args, nargs, &region_size);
  if (i == -2) return nullptr;
  if (i < 0 || self->ranges->sizes[static_cast<size_t>(i)] != region_size) {
    PyErr_SetString(PyExc_ValueError, "drop_region(): the region is not wholly free");
    return nullptr;
  }
  self->ranges->starts.erase(self->ranges->starts.begin() + i);
  self->ranges->sizes.erase(self->ranges->sizes.begin() + i);
  self->free_bytes -= static_cast<long long>(region_size);
  Py_RETURN_NONE;
}

PyObject* RangeAllocator_largest(RangeAllocator* self, PyObject*) {
  uint64_t best = 0;
  for (uint64_t s : self->ranges->sizes) best = std::max(best, s);
  return PyLong_FromUnsignedLongLong(best);
}

Py_ssize_t RangeAllocator_len(RangeAllocator* self) { return static_cast<Py_ssize_t>(self->ranges->starts.size()); }

PyMethodDef RangeAllocator_methods[] = {
    {"alloc", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(RangeAllocator_alloc)),
     METH_FASTCALL | METH_KEYWORDS,
     "alloc(size, from_top=False) -> start key or None: first fit from the lowest (or highest) address."},
    {"free", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(RangeAllocator_free)), METH_FASTCALL,
     "free(start, size): return a range, merging it with free neighbours."},
    {"ranges", reinterpret_cast<PyCFunction>(RangeAllocator_ranges), METH_NOARGS,
     "Every free range as (start key, size), in address order."},
    {"take_all", reinterpret_cast<PyCFunction>(RangeAllocator_take_all), METH_NOARGS,
     "Remove and return every free range as (start key, size)."},
    {"whole_region_free",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(RangeAllocator_whole_region_free)), METH_FASTCALL,
     "whole_region_free(region, region_size) -> bool"},
    {"drop_region", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(RangeAllocator_drop_region)),
     METH_FASTCALL, "drop_region(region, region_size): remove a wholly free region's range."},
    {"largest", reinterpret_cast<PyCFunction>(RangeAllocator_largest), METH_NOARGS, "Size of the largest free range."},
    {nullptr, nullptr, 0, nullptr}};

PyMemberDef RangeAllocator_members[] = {
    {"free_bytes", T_LONGLONG, offsetof(RangeAllocator, free_bytes), READONLY, "Bytes in all free ranges."},
    {nullptr, 0, 0, 0, nullptr}};

PySequenceMethods RangeAllocator_as_sequence = {};

PyTypeObject RangeAllocatorType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// ---------------------------------------------------------------------------------------- Lock

struct Lock {
  PyObject_HEAD
  std::mutex* mutex;
};

void lock_blocking(Lock* self) {
  if (self->mutex->try_lock()) return;
  Py_BEGIN_ALLOW_THREADS self->mutex->lock();
  Py_END_ALLOW_THREADS
}

// acquire(blocking=True) -> bool (no timeout: the pool never needs one)
PyObject* Lock_acquire(Lock* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  if (nargs > 1 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
    PyErr_SetString(PyExc_TypeError, "acquire(blocking=True) takes at most one positional argument");
    return nullptr;
  }
  int blocking = nargs ? PyObject_IsTrue(args[0]) : 1;
  if (blocking < 0) return nullptr;
  if (!blocking) return PyBool_FromLong(self->mutex->try_lock());
  lock_blocking(self);
  Py_RETURN_TRUE;
}

PyObject* Lock_release(Lock* self, PyObject*) {
  self->mutex->unlock();
  Py_RETURN_NONE;
}

PyObject* Lock_enter(Lock* self, PyObject*) {
  lock_blocking(self);
  Py_RETURN_TRUE;
}

PyObject* Lock_exit(Lock* self, PyObject* const*, Py_ssize_t) {
  self->mutex->unlock();
  Py_RETURN_FALSE;
}

PyMethodDef Lock_methods[] = {
    {"acquire", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(Lock_acquire)),
     METH_FASTCALL | METH_KEYWORDS, "acquire(blocking=True) -> bool"},
    {"release", reinterpret_cast<PyCFunction>(Lock_release), METH_NOARGS, "release()"},
    {"__enter__", reinterpret_cast<PyCFunction>(Lock_enter), METH_NOARGS, nullptr},
    {"__exit__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(Lock_exit)), METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject LockType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// ------------------------------------------------------------------------------------- LiveMap

struct LiveEntry {
  uint64_t key;
  long long nbytes;
  long long requested;
};

using LiveEntries = std::unordered_map<uintptr_t, LiveEntry>;

struct LiveMap {
  PyObject_HEAD
  LiveEntries* map;
};

PyObject* entry_tuple(const LiveEntry& e) {
  return Py_BuildValue("(KLL)", static_cast<unsigned long long>(e.key), e.nbytes, e.requested);
}

bool as_ptr(PyObject* obj, uintptr_t* out) {
  uint64_t v;
  if (!as_u64(obj, &v, "data_ptr")) return false;
  *out = static_cast<uintptr_t>(v);
  return true;
}

Py_ssize_t LiveMap_len(LiveMap* self) { return static_cast<Py_ssize_t>(self->map->size()); }

PyObject* LiveMap_getitem(LiveMap* self, PyObject* ptr_obj) {
  uintptr_t ptr;
  if (!as_ptr(ptr_obj, &ptr)) return nullptr;
  auto it = self->map->find(ptr);
  if (it == self->map->end()) {
    PyErr_SetObject(PyExc_KeyError, ptr_obj);
    return nullptr;
  }
  return entry_tuple(it->second);
}

int LiveMap_setitem(LiveMap* self, PyObject* ptr_obj, PyObject* value) {
  uintptr_t ptr;
  if (!as_ptr(ptr_obj, &ptr)) return -1;
  if (!value) {  // del live[ptr]
    if (self->map->erase(ptr) == 0) {
      PyErr_SetObject(PyExc_KeyError, ptr_obj);
      return -1;
    }
    return 0;
  }
  LiveEntry e;
  unsigned long long key;
  if (!PyArg_ParseTuple(value, "KLL", &key, &e.nbytes, &e.requested)) return -1;
  e.key = key;
  (*self->map)[ptr] = e;
  return 0;
}

// pop(ptr, default) -> entry tuple or default
PyObject* LiveMap_pop(LiveMap* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "pop(ptr[, default])");
    return nullptr;
  }
  uintptr_t ptr;
  if (!as_ptr(args[0], &ptr)) return nullptr;
  auto it = self->map->find(ptr);
  if (it == self->map->end()) {
    if (nargs == 2) return Py_NewRef(args[1]);
    PyErr_SetObject(PyExc_KeyError, args[0]);
    return nullptr;
  }
  PyObject* out = entry_tuple(it->second);
  if (out) self->map->erase(it);
  return out;
}

PyObject* LiveMap_values(LiveMap* self, PyObject*) {
  PyObject* out = PyList_New(0);
  if (!out) return nullptr;
  for (const auto& kv : *self->map) {
    PyObject* item = entry_tuple(kv.second);
    if (!item || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return out;
}

PyMethodDef LiveMap_methods[] = {
    {"pop", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(LiveMap_pop)), METH_FASTCALL,
     "pop(ptr[, default]) -> (key, nbytes, requested)"},
    {"values", reinterpret_cast<PyCFunction>(LiveMap_values), METH_NOARGS, "Every live entry, in no order."},
    {nullptr, nullptr, 0, nullptr}};

PyMappingMethods LiveMap_as_mapping = {};

PyTypeObject LiveMapType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// ------------------------------------------------------------------------------------ Counters

struct Counters {
  PyObject_HEAD
  long long hits;
  long long misses;
  long long in_use;
  long long requested;
  long long peak_in_use;
  long long peak_requested;
  char long_top;  // placement: the latest long-lived block sits at the top end (T_BOOL: a char)
};

PyObject* Counters_new(PyTypeObject* type, PyObject*, PyObject*) {
  auto* self = reinterpret_cast<Counters*>(type->tp_alloc(type, 0));
  if (self) self->long_top = 1;
  return reinterpret_cast<PyObject*>(self);
}

PyMemberDef Counters_members[] = {
    {"hits", T_LONGLONG, offsetof(Counters, hits), 0, nullptr},
    {"misses", T_LONGLONG, offsetof(Counters, misses), 0, nullptr},
    {"in_use", T_LONGLONG, offsetof(Counters, in_use), 0, nullptr},
    {"requested", T_LONGLONG, offsetof(Counters, requested), 0, nullptr},
    {"peak_in_use", T_LONGLONG, offsetof(Counters, peak_in_use), 0, nullptr},
    {"peak_requested", T_LONGLONG, offsetof(Counters, peak_requested), 0, nullptr},
    {"long_top", T_BOOL, offsetof(Counters, long_top), 0, nullptr},
    {nullptr, 0, 0, 0, nullptr}};

PyTypeObject CountersType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// ------------------------------------------------------------------------------------ FastPath

struct FastPath {
  PyObject_HEAD
  PyObject* pool;          // the DeviceBufferPool (for the Python path)
  PyObject* py_acquire;    // DeviceBufferPool.acquire (the function)
  PyObject* py_release;    // DeviceBufferPool.release
  PyObject* free;          // dict: stream key -> RangeAllocator
  LiveMap* live;           // data_ptr -> (key, rounded bytes, requested bytes)
  PyObject* typed;         // dict: region -> {dtype: slab viewed as dtype}
  Lock* lock;              // the pool's lock
  PyObject* current_key;   // the current stream's key: current_key(key_arg), current_key(), or None if null
  PyObject* key_arg;
  PyObject* device;        // the pool's torch.device and its str()
  PyObject* device_str;
  PyObject* get_device;    // () -> current CUDA device index (CUDA pools), else None
  long cuda_index;         // the pool's CUDA device index, -1 on CPU
  Counters* counters;
};

int FastPath_traverse(FastPath* self, visitproc visit, void* arg) {
  Py_VISIT(self->pool);
  Py_VISIT(self->py_acquire);
  Py_VISIT(self->py_release);
  Py_VISIT(self->free);
  Py_VISIT(reinterpret_cast<PyObject*>(self->live));
  Py_VISIT(self->typed);
  Py_VISIT(reinterpret_cast<PyObject*>(self->lock));
  Py_VISIT(self->current_key);
  Py_VISIT(self->key_arg);
  Py_VISIT(self->device);
  Py_VISIT(self->device_str);
  Py_VISIT(self->get_device);
  Py_VISIT(reinterpret_cast<PyObject*>(self->counters));
  return 0;
}

int FastPath_clear(FastPath* self) {
  Py_CLEAR(self->pool);
  Py_CLEAR(self->py_acquire);
  Py_CLEAR(self->py_release);
  Py_CLEAR(self->free);
  Py_CLEAR(self->live);
  Py_CLEAR(self->typed);
  Py_CLEAR(self->lock);
  Py_CLEAR(self->current_key);
  Py_CLEAR(self->key_arg);
  Py_CLEAR(self->device);
  Py_CLEAR(self->device_str);
  Py_CLEAR(self->get_device);
  Py_CLEAR(self->counters);
  return 0;
}

void FastPath_dealloc(FastPath* self) {
  PyObject_GC_UnTrack(self);
  FastPath_clear(self);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

int FastPath_init(FastPath* self, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"pool",    "py_acquire", "py_release", "free",       "live",       "typed",
                                "lock",    "current_key", "key_arg",   "device",     "device_str", "get_device",
                                "cuda_index", "counters", nullptr};
  PyObject *pool, *py_acquire, *py_release, *free, *live, *typed, *lock, *current_key, *key_arg, *device;
  PyObject *device_str, *get_device, *counters;
  long cuda_index;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO!O!O!O!OOOUOlO!", const_cast<char**>(names), &pool,
                                   &py_acquire, &py_release, &PyDict_Type, &free, &LiveMapType, &live, &PyDict_Type,
                                   &typed, &LockType, &lock, &current_key, &key_arg, &device, &device_str, &get_device,
                                   &cuda_index, &CountersType, &counters))
    return -1;
  FastPath_clear(self);
  Py_INCREF(pool), self->pool = pool;
  Py_INCREF(py_acquire), self->py_acquire = py_acquire;
  Py_INCREF(py_release), self->py_release = py_release;
  Py_INCREF(free), self->free = free;
  Py_INCREF(live), self->live = reinterpret_cast<LiveMap*>(live);
  Py_INCREF(typed), self->typed = typed;
  Py_INCREF(lock), self->lock = reinterpret_cast<Lock*>(lock);
  Py_INCREF(current_key), self->current_key = current_key;
  Py_INCREF(key_arg), self->key_arg = key_arg;
  Py_INCREF(device), self->device = device;
  Py_INCREF(device_str), self->device_str = device_str;
  Py_INCREF(get_device), self->get_device = get_device;
  self->cuda_index = cuda_index;
  Py_INCREF(counters), self->counters = reinterpret_cast<Counters*>(counters);
  return 0;
}

// The pool's Python method with the caller's arguments, the pool prepended.
PyObject* python_path(FastPath* self, PyObject* func, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  if (!self->pool) {
    PyErr_SetString(PyExc_RuntimeError, "DeviceBufferPool fast path used after its pool was cleared");
    return nullptr;
  }
  Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  std::vector<PyObject*> full(static_cast<size_t>(nargs + nkw + 1));
  full[0] = self->pool;
  for (Py_ssize_t i = 0; i < nargs + nkw; ++i) full[static_cast<size_t>(i + 1)] = args[i];
  return PyObject_Vectorcall(func, full.data(), static_cast<size_t>(nargs + 1), kwnames);
}

// Non-blocking take of the pool lock: 1 taken, 0 busy.
int try_lock(FastPath* self) { return self->lock->mutex->try_lock() ? 1 : 0; }

void unlock(FastPath* self) { self->lock->mutex->unlock(); }

// The current CUDA device index, or -1 with an exception set.
long current_cuda_device(FastPath* self) {
#ifdef MEMORY_RUNTIME_WITH_CUDA
  if (self->current_key == Py_True) {
    try {
      return static_cast<long>(c10::cuda::current_device());
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
      return -1;
    }
  }
#endif
  PyObject* current = PyObject_CallNoArgs(self->get_device);
  if (!current) return -1;
  long index = PyLong_AsLong(current);
  Py_DECREF(current);
  return index;
}

// New reference to the current stream's key, or null with an exception set.
// current_key True: the pool's CUDA device's current stream as an int, read here (CUDA builds).
PyObject* stream_key(FastPath* self) {
  if (self->current_key == Py_None) Py_RETURN_NONE;
#ifdef MEMORY_RUNTIME_WITH_CUDA
  if (self->current_key == Py_True) {
    try {
      auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(self->cuda_index));
      return PyLong_FromVoidPtr(reinterpret_cast<void*>(stream.stream()));
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
      return nullptr;
    }
  }
#endif
  if (self->key_arg == Py_None) return PyObject_CallNoArgs(self->current_key);
  return PyObject_CallOneArg(self->current_key, self->key_arg);
}

// acquire(shape, dtype, device=None, *, long_lived=False) -> Tensor
PyObject* FastPath_acquire(FastPath* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  // ---- arguments: anything unusual goes to the Python method (which validates and explains)
  if (!self->pool || nargs < 2 || nargs > 3) return python_path(self, self->py_acquire, args, nargs, kwnames);
  PyObject* shape = args[0];
  PyObject* dtype = args[1];
  PyObject* device = nargs == 3 ? args[2] : Py_None;
  int long_lived = 0;
  Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, k);
    PyObject* value = args[nargs + k];
    if (PyUnicode_CompareWithASCIIString(name, "long_lived") == 0) {
      long_lived = PyObject_IsTrue(value);
      if (long_lived < 0) return nullptr;
    } else if (PyUnicode_CompareWithASCIIString(name, "device") == 0 && nargs == 2) {
      device = value;
    } else {
      return python_path(self, self->py_acquire, args, nargs, kwnames);
    }
  }
  if (device != Py_None && device != self->device) {
    // "cuda:N" as a string, or "cuda" while this pool's device is the current one
    bool same = false;
    if (PyUnicode_CheckExact(device)) {
      if (PyUnicode_Compare(device, self->device_str) == 0) {
        same = true;
      } else if (self->cuda_index >= 0 && PyUnicode_CompareWithASCIIString(device, "cuda") == 0) {
        long current = current_cuda_device(self);
        if (current < 0 && PyErr_Occurred()) return nullptr;
        same = current == self->cuda_index;
      }
      if (PyErr_Occurred()) return nullptr;
    }
    if (!same) return python_path(self, self->py_acquire, args, nargs, kwnames);
  }
  if (!PyTuple_CheckExact(shape) || !THPDtype_Check(dtype))
    return python_path(self, self->py_acquire, args, nargs, kwnames);
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
  if (ndim > MAX_DIMS) return python_path(self, self->py_acquire, args, nargs, kwnames);
  int64_t sizes[MAX_DIMS];
  int64_t strides[MAX_DIMS];
  const auto scalar_type = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(scalar_type));
  int64_t numel = 1;
  for (Py_ssize_t i = 0; i < ndim; ++i) {
    PyObject* d = PyTuple_GET_ITEM(shape, i);
    if (!PyLong_CheckExact(d)) return python_path(self, self->py_acquire, args, nargs, kwnames);
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(d, &overflow);
    if (overflow || v < 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return python_path(self, self->py_acquire, args, nargs, kwnames);
    }
    sizes[i] = v;
    if (v != 0 && numel > MAX_REQUEST_BYTES / itemsize / v)
      return python_path(self, self->py_acquire, args, nargs, kwnames);
    numel *= v;
  }
  // zero-element tensors own no memory: the Python method tracks them by identity
  if (numel == 0) return python_path(self, self->py_acquire, args, nargs, kwnames);
  int64_t acc = 1;
  for (Py_ssize_t i = ndim - 1; i >= 0; --i) {
    strides[i] = acc;
    acc *= sizes[i];
  }
  const int64_t requested = numel * itemsize;
  const int64_t nbytes = round_size(requested);

  PyObject* stream = stream_key(self);
  if (!stream) return nullptr;
  int locked = try_lock(self);
  if (locked <= 0) {
    Py_DECREF(stream);
    return locked < 0 ? nullptr : python_path(self, self->py_acquire, args, nargs, kwnames);
  }
  // ---- under the lock: the current stream's free ranges must hold a fit, else the Python way
  PyObject* ranges = PyDict_GetItemWithError(self->free, stream);  // borrowed
  Py_DECREF(stream);
  Counters* c = self->counters;
  const bool top = long_lived ? !c->long_top : c->long_top;
  uint64_t key = UINT64_MAX;
  if (ranges && Py_TYPE(ranges) == &RangeAllocatorType)
    key = ra_alloc(reinterpret_cast<RangeAllocator*>(ranges), static_cast<uint64_t>(nbytes), top);
  PyObject* base_obj = nullptr;
  if (key != UINT64_MAX) {
    PyObject* region = PyLong_FromUnsignedLongLong(key >> REGION_SHIFT);
    PyObject* by_dtype = region ? PyDict_GetItemWithError(self->typed, region) : nullptr;
    Py_XDECREF(region);
    if (by_dtype && PyDict_CheckExact(by_dtype)) base_obj = PyDict_GetItemWithError(by_dtype, dtype);
    if (!base_obj) ra_free(reinterpret_cast<RangeAllocator*>(ranges), key, static_cast<uint64_t>(nbytes));
  }
  if (!base_obj) {
    unlock(self);
    if (PyErr_Occurred()) return nullptr;
    return python_path(self, self->py_acquire, args, nargs, kwnames);
  }
  const uint64_t offset = key & OFFSET_MASK;
  PyObject* result = nullptr;
  uintptr_t ptr = 0;
  try {
    // A plain tensor on the slab's storage (not an autograd view of it: the block is the caller's).
    const at::Tensor& base = THPVariable_Unpack(base_obj);
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(), base.dtype());
    impl->set_sizes_and_strides(c10::IntArrayRef(sizes, static_cast<size_t>(ndim)),
                                c10::IntArrayRef(strides, static_cast<size_t>(ndim)),
                                base.storage_offset() + static_cast<int64_t>(offset) / itemsize);
    at::Tensor view(std::move(impl));
    ptr = reinterpret_cast<uintptr_t>(view.const_data_ptr());
    result = THPVariable_Wrap(view);
    if (result) (*self->live->map)[ptr] = LiveEntry{key, static_cast<long long>(nbytes), static_cast<long long>(requested)};
  } catch (const std::exception& e) {
    Py_CLEAR(result);
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  if (!result) {
    ra_free(reinterpret_cast<RangeAllocator*>(ranges), key, static_cast<uint64_t>(nbytes));
    unlock(self);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "DeviceBufferPool: could not make the tensor");
    return nullptr;
  }
  if (long_lived) c->long_top = top;
  c->hits += 1;
  c->in_use += nbytes;
  if (c->in_use > c->peak_in_use) c->peak_in_use = c->in_use;
  c->requested += requested;
  if (c->requested > c->peak_requested) c->peak_requested = c->requested;
  unlock(self);
  return result;
}

// release(tensor) -> None
PyObject* FastPath_release(FastPath* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  if (!self->pool || nargs != 1 || kwnames || !THPVariable_Check(args[0]))
    return python_path(self, self->py_release, args, nargs, kwnames);
  uintptr_t ptr;
  try {
    ptr = reinterpret_cast<uintptr_t>(THPVariable_Unpack(args[0]).const_data_ptr());
  } catch (const std::exception&) {
    return python_path(self, self->py_release, args, nargs, kwnames);
  }
  PyObject* stream = stream_key(self);
  if (!stream) return nullptr;
  int locked = try_lock(self);
  if (locked <= 0) {
    Py_DECREF(stream);
    return python_path(self, self->py_release, args, nargs, kwnames);
  }
  PyObject* ranges = PyDict_GetItemWithError(self->free, stream);  // borrowed
  Py_DECREF(stream);
  auto& live = *self->live->map;
  auto it = live.end();
  if (ranges && Py_TYPE(ranges) == &RangeAllocatorType) it = live.find(ptr);
  if (it == live.end()) {
    // unknown pointer (an error or a zero-element tensor), or a stream seen for the first time
    unlock(self);
    if (PyErr_Occurred()) return nullptr;
    return python_path(self, self->py_release, args, nargs, kwnames);
  }
  const uint64_t key = it->second.key;
  const auto nbytes = static_cast<uint64_t>(it->second.nbytes);
  const auto requested = static_cast<uint64_t>(it->second.requested);
  live.erase(it);
  Counters* c = self->counters;
  c->in_use -= static_cast<long long>(nbytes);
  c->requested -= static_cast<long long>(requested);
  ra_free(reinterpret_cast<RangeAllocator*>(ranges), key, nbytes);
  unlock(self);
  Py_RETURN_NONE;
}

PyMethodDef FastPath_methods[] = {
    {"acquire", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(FastPath_acquire)),
     METH_FASTCALL | METH_KEYWORDS, "DeviceBufferPool.acquire, native hot path (see DeviceBufferPool.acquire)."},
    {"release", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(FastPath_release)),
     METH_FASTCALL | METH_KEYWORDS, "DeviceBufferPool.release, native hot path (see DeviceBufferPool.release)."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject FastPathType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// The module is named by TORCH_EXTENSION_NAME, which torch.utils.cpp_extension defines from the
// name memory_runtime._native gives each build variant.
#ifndef TORCH_EXTENSION_NAME
#error "build through memory_runtime._native (torch.utils.cpp_extension defines TORCH_EXTENSION_NAME)"
#endif
#define MR_STR_(x) #x
#define MR_STR(x) MR_STR_(x)
#define MR_CAT_(a, b) a##b
#define MR_CAT(a, b) MR_CAT_(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, MR_STR(TORCH_EXTENSION_NAME), "Native hot path of DeviceBufferPool.",
                          -1, nullptr};

}  // namespace

PyMODINIT_FUNC MR_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  LockType.tp_name = "memory_runtime_native.Lock";
  LockType.tp_basicsize = sizeof(Lock);
  LockType.tp_flags = Py_TPFLAGS_DEFAULT;
  LockType.tp_doc = "A non-reentrant mutex with threading.Lock's acquire/release/with interface.";
  LockType.tp_new = owning_new<Lock, std::mutex, &Lock::mutex>;
  LockType.tp_dealloc = reinterpret_cast<destructor>(owning_dealloc<Lock, std::mutex, &Lock::mutex>);
  LockType.tp_methods = Lock_methods;

  LiveMapType.tp_name = "memory_runtime_native.LiveMap";
  LiveMapType.tp_basicsize = sizeof(LiveMap);
  LiveMapType.tp_flags = Py_TPFLAGS_DEFAULT;
  LiveMapType.tp_doc = "data_ptr -> (start key, rounded bytes, requested bytes) of a pool's live blocks.";
  LiveMapType.tp_new = owning_new<LiveMap, LiveEntries, &LiveMap::map>;
  LiveMapType.tp_dealloc = reinterpret_cast<destructor>(owning_dealloc<LiveMap, LiveEntries, &LiveMap::map>);
  LiveMapType.tp_methods = LiveMap_methods;
  LiveMap_as_mapping.mp_length = reinterpret_cast<lenfunc>(LiveMap_len);
  LiveMap_as_mapping.mp_subscript = reinterpret_cast<binaryfunc>(LiveMap_getitem);
  LiveMap_as_mapping.mp_ass_subscript = reinterpret_cast<objobjargproc>(LiveMap_setitem);
  LiveMapType.tp_as_mapping = &LiveMap_as_mapping;

  RangeAllocatorType.tp_name = "memory_runtime_native.RangeAllocator";
  RangeAllocatorType.tp_basicsize = sizeof(RangeAllocator);
  RangeAllocatorType.tp_flags = Py_TPFLAGS_DEFAULT;
  RangeAllocatorType.tp_doc = "Address-ordered free byte ranges: first fit from either end, coalescing on free.";
  RangeAllocatorType.tp_new = owning_new<RangeAllocator, Ranges, &RangeAllocator::ranges>;
  RangeAllocatorType.tp_dealloc =
      reinterpret_cast<destructor>(owning_dealloc<RangeAllocator, Ranges, &RangeAllocator::ranges>);
  RangeAllocatorType.tp_methods = RangeAllocator_methods;
  RangeAllocatorType.tp_members = RangeAllocator_members;
  RangeAllocator_as_sequence.sq_length = reinterpret_cast<lenfunc>(RangeAllocator_len);
  RangeAllocatorType.tp_as_sequence = &RangeAllocator_as_sequence;

  CountersType.tp_name = "memory_runtime_native.Counters";
  CountersType.tp_basicsize = sizeof(Counters);
  CountersType.tp_flags = Py_TPFLAGS_DEFAULT;
  CountersType.tp_doc = "The counters a DeviceBufferPool's Python and native paths share.";
  CountersType.tp_new = Counters_new;
  CountersType.tp_members = Counters_members;

  FastPathType.tp_name = "memory_runtime_native.FastPath";
  FastPathType.tp_basicsize = sizeof(FastPath);
  FastPathType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  FastPathType.tp_doc = "acquire/release of one DeviceBufferPool for the common case; the rest goes to its Python methods.";
  FastPathType.tp_new = PyType_GenericNew;
  FastPathType.tp_init = reinterpret_cast<initproc>(FastPath_init);
  FastPathType.tp_dealloc = reinterpret_cast<destructor>(FastPath_dealloc);
  FastPathType.tp_traverse = reinterpret_cast<traverseproc>(FastPath_traverse);
  FastPathType.tp_clear = reinterpret_cast<inquiry>(FastPath_clear);
  FastPathType.tp_methods = FastPath_methods;

  if (PyType_Ready(&LockType) < 0 || PyType_Ready(&LiveMapType) < 0 || PyType_Ready(&RangeAllocatorType) < 0 || PyType_Ready(&CountersType) < 0 || PyType_Ready(&FastPathType) < 0)
    return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  Py_INCREF(&LockType);
  Py_INCREF(&LiveMapType);
  Py_INCREF(&RangeAllocatorType);
  Py_INCREF(&CountersType);
  Py_INCREF(&FastPathType);
  if (PyModule_AddObject(m, "Lock", reinterpret_cast<PyObject*>(&LockType)) < 0 ||
      PyModule_AddObject(m, "LiveMap", reinterpret_cast<PyObject*>(&LiveMapType)) < 0 ||
      PyModule_AddObject(m, "RangeAllocator", reinterpret_cast<PyObject*>(&RangeAllocatorType)) < 0 ||
      PyModule_AddObject(m, "Counters", reinterpret_cast<PyObject*>(&CountersType)) < 0 ||
      PyModule_AddObject(m, "FastPath", reinterpret_cast<PyObject*>(&FastPathType)) < 0 ||
      PyModule_AddIntConstant(m, "REGION_SHIFT", REGION_SHIFT) < 0 ||
      PyModule_AddIntConstant(m, "ALIGNMENT", ALIGNMENT) < 0 ||
      PyModule_AddIntConstant(m, "SUBCLASS_BITS", SUBCLASS_BITS) < 0 ||
#ifdef MEMORY_RUNTIME_WITH_CUDA
      PyModule_AddIntConstant(m, "WITH_CUDA", 1) < 0) {
#else
      PyModule_AddIntConstant(m, "WITH_CUDA", 0) < 0) {
#endif
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
