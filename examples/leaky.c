/*
 * leaky: a tiny "service" with one memory leak, for `cargo xtask demo`.
 *
 * It handles ITERATIONS (300) requests, one every 10 ms (about 3 seconds), then exits 0.
 * Each request goes main -> handle_request, which calls the three others:
 *
 *   handle_request  malloc(4096): the request buffer, freed before it returns.
 *   parse_header    calloc(32, 16) = 512 bytes of field offsets, freed before it returns.
 *   cache_insert    malloc(256): a cache entry, kept in a cache that is never evicted.
 *                   THIS IS THE LEAK.
 *   grow_log        realloc()s the log buffer 64 bytes larger on every call and keeps it;
 *                   main frees it once, just before exiting.
 *
 * What the tracer should report:
 *   live at exit:   cache_insert  300 blocks, 300 * 256 = 76,800 bytes.
 *                   Nothing else from this program is live: the other three free
 *                   everything they allocate. (Output uses write(2), not stdio, so libc
 *                   allocates no stdout buffer either.)
 *   allocated over the run:
 *                   handle_request  300 * 4096 = 1,228,800 bytes
 *                   parse_header    300 * 512  =   153,600 bytes
 *                   cache_insert    300 * 256  =    76,800 bytes
 *                   grow_log        300 reallocs, from 64 up to 300 * 64 = 19,200 bytes
 *                   In all 1,200 calls (300 each of malloc, calloc, malloc, realloc) and
 *                   900 frees (checked with valgrind).
 *
 * Build: cc -O1 -g -fno-omit-frame-pointer -o leaky leaky.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ITERATIONS 300
#define REQUEST_SIZE 4096
#define MAX_FIELDS 32
#define LOG_RECORD_SIZE 64

struct field {
	size_t start;
	size_t len;
};
_Static_assert(sizeof(struct field) == 16, "parse_header allocates 32 * 16 = 512 bytes");

struct cache_entry {
	unsigned id;
	char key[252];
};
_Static_assert(sizeof(struct cache_entry) == 256, "each leaked entry is 256 bytes");

/* Every block is stored here before it is freed, so the compiler cannot drop a malloc+free pair. */
static void *volatile sink;

static struct cache_entry *cache[ITERATIONS]; /* never evicted */
static unsigned cache_len;

static char *log_buf;
static size_t log_len;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Splits the header into lines; the field table is scratch space, freed before returning. */
__attribute__((noinline)) static unsigned parse_header(const char *request)
{
	struct field *fields = calloc(MAX_FIELDS, sizeof(struct field));
	if (!fields)
		die("calloc");
	sink = fields;

	unsigned count = 0;
	size_t start = 0;
	for (size_t i = 0; request[i] != '\0' && count < MAX_FIELDS; i++) {
		if (request[i] == '\n') {
			fields[count].start = start;
			fields[count].len = i - start;
			count++;
			start = i + 1;
		}
	}
	free(fields);
	return count;
}

/* The leak: one 256-byte entry per request, and nothing ever removes entries. */
__attribute__((noinline)) static void cache_insert(unsigned id, const char *request)
{
	struct cache_entry *entry = malloc(sizeof *entry);
	if (!entry)
		die("malloc");
	entry->id = id;
	strncpy(entry->key, request, sizeof entry->key - 1);
	entry->key[sizeof entry->key - 1] = '\0';
	cache[cache_len++] = entry;
}

/* Appends one 64-byte record to the log, growing the single log buffer with realloc. */
__attribute__((noinline)) static void grow_log(unsigned id, unsigned fields)
{
	char *grown = realloc(log_buf, log_len + LOG_RECORD_SIZE);
	if (!grown)
		die("realloc");
	log_buf = grown;
	snprintf(log_buf + log_len, LOG_RECORD_SIZE, "request %u: %u header lines", id, fields);
	log_len += LOG_RECORD_SIZE;
}

__attribute__((noinline)) static void handle_request(unsigned id)
{
	char *request = malloc(REQUEST_SIZE);
	if (!request)
		die("malloc");
	sink = request;
	snprintf(request, REQUEST_SIZE,
		 "GET /item/%u HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n", id);

	unsigned fields = parse_header(request);
	cache_insert(id, request);
	grow_log(id, fields);
	free(request);
}

int main(void)
{
	const struct timespec pause = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };

	for (unsigned id = 0; id < ITERATIONS; id++) {
		handle_request(id);
		nanosleep(&pause, NULL);
	}

	free(log_buf);

	/* Walking the cache keeps it (and so the leaked entries) reachable to the very end. */
	size_t cached_bytes = 0;
	for (unsigned i = 0; i < cache_len; i++)
		if (cache[i])
			cached_bytes += sizeof *cache[i];

	char line[128];
	int len = snprintf(line, sizeof line,
			   "leaky: handled %u requests; %u cache entries (%zu bytes) still live\n",
			   ITERATIONS, cache_len, cached_bytes);
	if (write(STDOUT_FILENO, line, (size_t)len) < 0)
		return 1;
	return 0;
}
