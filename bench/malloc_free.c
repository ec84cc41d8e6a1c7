/*
 * malloc_free: the cost of one malloc(64) + free pair, for `cargo xtask bench`.
 *
 * Usage: malloc_free [--wait] [--keep-every K] [PAIRS]      (default 2,000,000 pairs)
 *
 *   --wait           print "ready", then start only once a line arrives on stdin (so that a
 *                    tracer can attach to the running process first)
 *   --keep-every K   keep every K-th block instead of freeing it (K = 10: 10% kept), so that
 *                    live blocks pile up as in a leaking program
 *
 * Prints one line, ns_per_pair=<float>: the time of the measured loop (CLOCK_MONOTONIC) per
 * iteration, one malloc and (unless kept) one free. Process start-up and the warm-up are not
 * timed, so under a tracer the figure is the per-call cost of tracing, not its start-up.
 *
 * Build: cc -O2 -fno-omit-frame-pointer -o malloc_free malloc_free.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_PAIRS 2000000UL
#define WARMUP_PAIRS 10000UL
#define BLOCK_SIZE 64

/* Each block is written and stored here, so the compiler cannot drop the malloc+free pair. */
static void *volatile sink;
/* Kept blocks, so that they stay reachable (and valgrind calls them live, not lost). */
static void **kept;
static unsigned long n_kept;

__attribute__((noinline)) static void malloc_free_pairs(unsigned long pairs, unsigned long keep_every)
{
	for (unsigned long i = 0; i < pairs; i++) {
		char *block = malloc(BLOCK_SIZE);
		if (!block) {
			perror("malloc");
			exit(1);
		}
		block[0] = (char)i;
		sink = block;
		if (keep_every != 0 && i % keep_every == 0)
			kept[n_kept++] = block;
		else
			free(block);
	}
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static unsigned long parse_count(const char *prog, const char *what, const char *text)
{
	char *end;
	errno = 0;
	unsigned long value = strtoul(text, &end, 10);
	if (errno != 0 || *end != '\0' || end == text || value == 0 || text[0] == '-') {
		fprintf(stderr, "%s: %s must be a positive integer, got '%s'\n", prog, what, text);
		exit(2);
	}
	return value;
}

int main(int argc, char **argv)
{
	unsigned long pairs = DEFAULT_PAIRS;
	unsigned long keep_every = 0;
	int wait = 0, have_pairs = 0;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--wait") == 0) {
			wait = 1;
		} else if (strcmp(argv[i], "--keep-every") == 0 && i + 1 < argc) {
			keep_every = parse_count(argv[0], "--keep-every", argv[++i]);
		} else if (!have_pairs && argv[i][0] != '-') {
			pairs = parse_count(argv[0], "PAIRS", argv[i]);
			have_pairs = 1;
		} else {
			fprintf(stderr, "usage: %s [--wait] [--keep-every K] [PAIRS]\n", argv[0]);
			return 2;
		}
	}
	if (keep_every != 0) {
		kept = malloc(sizeof(void *) * (pairs / keep_every + WARMUP_PAIRS / keep_every + 2));
		if (!kept) {
			perror("malloc");
			return 1;
		}
	}

	malloc_free_pairs(WARMUP_PAIRS, keep_every);
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
	malloc_free_pairs(pairs, keep_every);
	double elapsed = now_ns() - start;

	printf("ns_per_pair=%.3f\n", elapsed / (double)pairs);
	fflush(stdout);
	return 0;
}
