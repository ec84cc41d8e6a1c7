//! The most telling frame of a stack: the first one, from the leaf, that a user would
//! recognise as the caller, i.e. outside the allocator and the runtimes' allocation wrappers.
//! [`ALLOCATION_WRAPPERS`] is the one list of the functions skipped.
use super::Frame;

/// How a function name is matched.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// The whole (demangled) name.
    Exact(&'static str),
    /// The start of the name: a C++ class or namespace and everything in it, or a function
    /// whatever its parameter list.
    Prefix(&'static str),
}

impl Pattern {
    fn matches(self, name: &str) -> bool {
        match self {
            Pattern::Exact(e) => name == e,
            Pattern::Prefix(p) => name.starts_with(p),
        }
    }
}

/// Functions that allocate on someone else's behalf: a stack's telling frame is the first
/// frame below all of them. Names are as the symbolizer gives them (demangled, without
/// parameters for C, with them for C++). Functions a program calls to get memory for its own
/// purpose (`strdup`, `std::string`'s constructor, `asprintf`) are not here: their caller is
/// rarely more telling than they are, and they are what the user wrote.
pub const ALLOCATION_WRAPPERS: &[Pattern] = &[
    // glibc's malloc family, under its exported and internal names.
    Pattern::Exact("malloc"),
    Pattern::Exact("calloc"),
    Pattern::Exact("realloc"),
    Pattern::Exact("reallocarray"),
    Pattern::Exact("free"),
    Pattern::Exact("posix_memalign"),
    Pattern::Exact("aligned_alloc"),
    Pattern::Exact("memalign"),
    Pattern::Exact("valloc"),
    Pattern::Exact("pvalloc"),
    Pattern::Prefix("__libc_malloc"),
    Pattern::Prefix("__libc_calloc"),
    Pattern::Prefix("__libc_realloc"),
    Pattern::Prefix("__libc_reallocarray"),
    Pattern::Prefix("__libc_memalign"),
    Pattern::Prefix("__libc_valloc"),
    Pattern::Prefix("__libc_pvalloc"),
    Pattern::Exact("__posix_memalign"),
    Pattern::Exact("_mid_memalign"),
    Pattern::Exact("_int_malloc"),
    Pattern::Exact("_int_realloc"),
    Pattern::Exact("_int_memalign"),
    Pattern::Exact("_int_free"),
    Pattern::Prefix("sysmalloc"),
    Pattern::Exact("tcache_init"),
    Pattern::Exact("ptmalloc_init"),
    Pattern::Prefix("malloc_hook_ini"),
    Pattern::Exact("new_heap"),
    Pattern::Exact("alloc_new_heap"),
    Pattern::Exact("_int_new_arena"),
    Pattern::Exact("arena_get2"),
    Pattern::Exact("arena_get_retry"),
    // The system calls behind it (and behind any allocator): mmap-family stacks start here.
    Pattern::Exact("mmap"),
    Pattern::Exact("mmap64"),
    Pattern::Exact("__mmap"),
    Pattern::Exact("__mmap64"),
    Pattern::Exact("mremap"),
    Pattern::Exact("__mremap"),
    Pattern::Exact("brk"),
    Pattern::Exact("__brk"),
    Pattern::Exact("sbrk"),
    Pattern::Exact("__sbrk"),
    Pattern::Exact("__glibc_morecore"),
    Pattern::Exact("__default_morecore"),
    // C++: operator new in all its forms, and libstdc++'s allocator templates.
    Pattern::Prefix("operator new"),
    Pattern::Prefix("std::__new_allocator<"),
    Pattern::Prefix("__gnu_cxx::new_allocator<"),
    Pattern::Prefix("std::allocator_traits<"),
    Pattern::Prefix("std::allocator<"),
    // node: its ArrayBuffer allocators and malloc wrappers.
    Pattern::Prefix("node::NodeArrayBufferAllocator::"),
    Pattern::Prefix("node::DebuggingArrayBufferAllocator::"),
    Pattern::Prefix("node::UncheckedMalloc"),
    Pattern::Prefix("node::UncheckedCalloc"),
    Pattern::Prefix("node::UncheckedRealloc"),
    Pattern::Prefix("node::Malloc<"),
    Pattern::Prefix("node::Calloc<"),
    Pattern::Prefix("node::Realloc<"),
    // V8: backing stores of ArrayBuffers (every Buffer), and its own malloc wrappers.
    Pattern::Prefix("v8::internal::Heap::AllocateExternalBackingStore"),
    Pattern::Prefix("v8::internal::BackingStore::"),
    Pattern::Prefix("v8::internal::Malloced::"),
    Pattern::Prefix("v8::internal::AllocWithRetry"),
    Pattern::Prefix("v8::internal::AlignedAllocWithRetry"),
    Pattern::Prefix("v8::base::OS::Allocate"),
];

/// Whether `function` is one of [`ALLOCATION_WRAPPERS`]. glibc's internal aliases
/// (`__GI___mmap64`, from its debug symbols) count as the function they alias.
pub fn is_allocation_wrapper(function: &str) -> bool {
    let function = function.strip_prefix("__GI_").unwrap_or(function);
    ALLOCATION_WRAPPERS.iter().any(|p| p.matches(function))
}

/// Index of the telling frame of `frames` (leaf first): the first frame that is not an
/// allocation wrapper. An unnamed frame counts as telling (nothing says it is a wrapper, and
/// its place is the best clue there is). None when every frame is a wrapper (a stack cut
/// short inside the allocator) or there are no frames.
pub fn telling_frame(frames: &[Frame]) -> Option<usize> {
    frames
        .iter()
        .position(|f| !f.function.as_deref().is_some_and(is_allocation_wrapper))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::FrameKind;

    fn frame(function: Option<&str>) -> Frame {
        Frame {
            address: 0x1000,
            module: Some("/usr/bin/app".into()),
            offset: 0x1000,
            function: function.map(str::to_owned),
            file: None,
            line: None,
            inlined: false,
            kind: FrameKind::Native,
            column: None,
            current_line: None,
        }
    }

    fn telling(names: &[Option<&str>]) -> Option<usize> {
        telling_frame(&names.iter().map(|n| frame(*n)).collect::<Vec<_>>())
    }

    #[test]
    fn the_caller_of_malloc_is_telling() {
        assert_eq!(telling(&[Some("malloc"), Some("cache_insert"), Some("main")]), Some(1));
    }

    #[test]
    fn node_buffers_skip_the_array_buffer_allocator_and_backing_store() {
        let chain = [
            Some("calloc"),
            Some("node::NodeArrayBufferAllocator::Allocate(unsigned long)"),
            Some("v8::internal::Heap::AllocateExternalBackingStore(std::function<void* (unsigned long)> const&, unsigned long)"),
            Some("v8::internal::BackingStore::Allocate(v8::internal::Isolate*, unsigned long, v8::internal::SharedFlag, v8::internal::InitializedFlag)"),
            Some("v8::internal::Builtin_ArrayBufferConstructor(int, unsigned long*, v8::internal::Isolate*)"),
        ];
        assert_eq!(telling(&chain), Some(4));
    }

    #[test]
    fn operator_new_and_mmap_family_are_skipped() {
        assert_eq!(telling(&[Some("malloc"), Some("operator new(unsigned long)"), Some("Cache::grow()")]), Some(2));
        assert_eq!(telling(&[Some("__mmap64"), Some("sysmalloc"), Some("_int_malloc"), Some("malloc"), Some("f")]), Some(4));
        assert_eq!(telling(&[Some("__GI___mmap64"), Some("__GI___libc_malloc"), Some("f")]), Some(2));
    }

    #[test]
    fn strdup_is_what_the_user_called_and_unnamed_frames_are_telling() {
        assert_eq!(telling(&[Some("malloc"), Some("strdup"), Some("f")]), Some(1));
        assert_eq!(telling(&[Some("malloc"), None, Some("f")]), Some(1));
    }

    #[test]
    fn names_that_only_look_alike_are_not_wrappers() {
        // Prefixes stop at a namespace or template bracket: these are someone's own functions.
        assert!(!is_allocation_wrapper("mallocate_things"));
        assert!(!is_allocation_wrapper("node::MallocedBuffer<char>::Release()"));
        assert!(!is_allocation_wrapper("freelist_pop"));
    }

    #[test]
    fn a_stack_of_wrappers_only_has_no_telling_frame() {
        assert_eq!(telling(&[Some("malloc"), Some("_int_malloc")]), None);
        assert_eq!(telling(&[]), None);
    }
}
