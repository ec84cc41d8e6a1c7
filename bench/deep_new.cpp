/*
 * deep_new: the cost of one `new char[64]` + `delete[]` pair made 20 frames deep, for `cargo
 * xtask bench`: what walking a deeper stack (through libstdc++'s operator new, which keeps no
 * frame pointer) adds per call, with `--unwind fp` and with the unwind rows.
 *
 * Usage: deep_new [--wait] [PAIRS]      (default 2,000,000 pairs)
 *
 *   --wait   print "ready", then start only once a line arrives on stdin (so that a tracer
 *            can attach to the running process first)
 *
 * Prints one line, ns_per_pair=<float>: the time of the measured loop (CLOCK_MONOTONIC) per
 * pair. The 20 frames are taken once per run, not once per pair: the loop sits at the bottom.
 *
 * Build: g++ -O2 -fno-omit-frame-pointer -o deep_new deep_new.cpp
 */
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#define DEFAULT_PAIRS 2000000UL
#define WARMUP_PAIRS 10000UL
#define DEPTH 20

static char *volatile sink;

__attribute__((noinline)) static void pairs_here(unsigned long pairs)
{
	for (unsigned long i = 0; i < pairs; i++) {
		char *block = new char[64];
		block[0] = (char)i;
		sink = block;
		delete[] block;
	}
}

/* depth frames of its own above pairs_here; the work after the call keeps each a real call. */
__attribute__((noinline)) static void descend(int depth, unsigned long pairs)
{
	if (depth <= 1)
		pairs_here(pairs);
	else
		descend(depth - 1, pairs);
	sink = nullptr;
}

static double now_ns()
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	unsigned long pairs = DEFAULT_PAIRS;
	bool wait = false, have_pairs = false;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--wait") == 0) {
			wait = true;
		} else if (!have_pairs && argv[i][0] != '-') {
			char *end;
			errno = 0;
			pairs = strtoul(argv[i], &end, 10);
			if (errno != 0 || *end != '\0' || end == argv[i] || pairs == 0) {
				fprintf(stderr, "%s: PAIRS must be a positive integer, got '%s'\n", argv[0], argv[i]);
				return 2;
			}
			have_pairs = true;
		} else {
			fprintf(stderr, "usage: %s [--wait] [PAIRS]\n", argv[0]);
			return 2;
		}
	}
	descend(DEPTH, WARMUP_PAIRS);
	if (wait) {
		char line[64];
		printf("ready\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin)) {
			fprintf(stderr, "%s: stdin closed before the go line\n", argv[0]);
			return 1;
		}
	}
	double start = now_ns();
	descend(DEPTH, pairs);
	double elapsed = now_ns() - start;
	printf("ns_per_pair=%.3f\n", elapsed / (double)pairs);
	fflush(stdout);
	return 0;
}
