# Loaded by tests/support/gdb.rs into `gdb -batch`: stops at the entry of allocator functions
# when a condition holds, prints every frame of each stop in a line format gdb.rs parses, and
# runs the inferior to its end. Parameters come from convenience variables set with -ex before
# this script is sourced:
#   $tracer_breaks   "malloc:$rdi==5110||$rdi==5120;calloc:$rdi*$rsi==64" (function:condition)
#   $tracer_every    stop at every k-th hit that meets the condition (1: every hit)
#   $tracer_max_hits stop collecting after this many stops (0: no limit)
#   $tracer_depth    frames per stop (0: all)
# Output, one line each, tab-separated:
#   GDB-READY                         breakpoints are set, the inferior is about to run
#   GDB-HIT <n> <function> <size>     a stop at <function>'s first instruction, asked for
#                                     <size> bytes (0 for a function not in SIZES)
#   GDB-FRAME <level> <kind> <pc> <module> <offset> <name>
#                                     kind: normal | inline | sigtramp | other; pc and offset
#                                     in hex; module "-" when no file mapping holds pc; name
#                                     "-" when gdb has none
#   GDB-END <n>
#   GDB-DONE <hits>                   the inferior exited
import sys

import gdb


def conv(name, default):
    value = gdb.convenience_variable(name)
    if value is None:
        return default
    if value.type.code == gdb.TYPE_CODE_ARRAY:
        return value.string()
    return int(value)


BREAKS = conv("tracer_breaks", "malloc:1")
EVERY = max(1, conv("tracer_every", 1))
MAX_HITS = conv("tracer_max_hits", 0)
DEPTH = conv("tracer_depth", 0)
# The bytes each allocator is asked for, from its argument registers at its first instruction.
SIZES = {"malloc": "$rdi", "calloc": "$rdi * $rsi", "realloc": "$rsi"}


def file_mappings(pid):
    """(start, end, file offset, path) of every file mapping of the process."""
    out = []
    with open("/proc/%d/maps" % pid) as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, int(fields[2], 16), fields[5].rstrip("\n")))
    return out


KINDS = {gdb.NORMAL_FRAME: "normal", gdb.INLINE_FRAME: "inline", gdb.SIGTRAMP_FRAME: "sigtramp"}

state = {"seen": 0, "hits": 0, "done": False}


def print_stack(function):
    state["hits"] += 1
    n = state["hits"]
    maps = file_mappings(gdb.selected_inferior().pid)
    size = int(gdb.parse_and_eval("(unsigned long)(%s)" % SIZES.get(function, "0")))
    print("GDB-HIT\t%d\t%s\t%d" % (n, function, size))
    frame = gdb.newest_frame()
    level = 0
    while frame is not None and (DEPTH == 0 or level < DEPTH):
        pc = frame.pc()
        module, offset = "-", pc
        for start, end, off, path in maps:
            if start <= pc < end:
                module, offset = path, pc - start + off
                break
        name = frame.name() or "-"
        kind = KINDS.get(frame.type(), "other")
        print("GDB-FRAME\t%d\t%s\t%#x\t%s\t%#x\t%s" % (level, kind, pc, module, offset, name))
        level += 1
        try:
            frame = frame.older()
        except gdb.error as e:
            print("GDB-UNWIND-ERROR\t%s" % e)
            break
    print("GDB-END\t%d" % n)


class AllocBreak(gdb.Breakpoint):
    def __init__(self, function, address, condition):
        super().__init__("*%#x" % address, internal=True)
        self.function = function
        self.test = condition
        self.silent = True

    def stop(self):
        if state["done"]:
            return False
        if self.test and int(gdb.parse_and_eval(self.test)) == 0:
            return False
        state["seen"] += 1
        if state["seen"] % EVERY != 0:
            return False
        print_stack(self.function)
        if MAX_HITS and state["hits"] >= MAX_HITS:
            state["done"] = True
            return True  # stop once more, to detach (attach mode) or kill (launch mode)
        return False  # the stack is printed from here; the inferior runs on


def function_address(name):
    """The address of libc's function `name` (where the tracer's uprobe sits), never a PLT
    stub of the program: checked against the process's mappings."""
    address = int(gdb.parse_and_eval("(long)&'%s'" % name))
    for start, end, _, path in file_mappings(gdb.selected_inferior().pid):
        if start <= address < end:
            if path.rsplit("/", 1)[-1].startswith("libc.so"):
                return address
            raise gdb.GdbError("%s resolves to %#x in %s, not in libc" % (name, address, path))
    raise gdb.GdbError("%s resolves to %#x, which no file mapping holds" % (name, address))


gdb.execute("set pagination off")
gdb.execute("set confirm off")
if gdb.selected_inferior().pid == 0:
    # Launch mode: run to main, so that libc is mapped and its functions have addresses.
    gdb.execute("tbreak main")
    gdb.execute("run")
gdb.execute("set backtrace past-main on")
gdb.execute("set print frame-arguments none")
# Signals the fixtures send themselves (a handler that allocates) go straight to the inferior.
gdb.execute("handle SIGUSR1 SIGUSR2 SIGALRM SIGCHLD SIGPIPE nostop noprint pass")
for spec in BREAKS.split(";"):
    function, _, condition = spec.partition(":")
    AllocBreak(function, function_address(function), condition or None)
print("GDB-READY")
sys.stdout.flush()
# `continue` returns when the inferior exits, or when it stops for another reason (a signal
# not passed above): go on until it is gone.
while gdb.selected_inferior().pid != 0:
    if state["done"]:
        if gdb.selected_inferior().was_attached:
            gdb.execute("detach")
        else:
            gdb.execute("kill")
        break
    try:
        gdb.execute("continue")
    except gdb.error as e:
        print("GDB-ERROR\t%s" % e)
        break
print("GDB-DONE\t%d" % state["hits"])
