/*
 * busca: the handler of the "service_busca" queue, which looks a person up
 * by name in an SQLite database filled from a JSON data file.
 */
#ifndef SVC_BUSCA_H
#define SVC_BUSCA_H

#include "mqrpc/mqrpc.h"

#include <stddef.h>

/* busca_db is an open people database with its lookup statement ready. */
typedef struct busca_db busca_db;

/*
 * busca_open opens the SQLite database at db_path, creating the file and its
 * parent directories if missing. When the table of people does not exist or
 * is empty, it is created and filled from data_path, a JSON array of
 * {"nome": string, "idade": integer, "cidade": string}, in one transaction;
 * otherwise data_path is not read. The check and the import run under
 * BEGIN IMMEDIATE with a 5 s busy timeout, so instances started together
 * import once: the others wait and find the table filled. Two names with
 * the same busca_key are a data error and nothing is imported. Blocks on
 * file I/O and, at most 5 s, on another instance's import.
 * Returns the handle, which the caller frees with busca_close, or NULL with
 * a one-line reason written to err (errlen bytes, always NUL-terminated;
 * err may be NULL), e.g. "cannot read data file X: No such file or
 * directory" or "data file X: line 3: ...".
 */
busca_db *busca_open(const char *db_path, const char *data_path, char *err,
                     size_t errlen);

/* busca_close closes the database and frees db. Accepts NULL. */
void busca_close(busca_db *db);

/*
 * busca_handle is an mqrpc_handler_fn, safe to run on several handler
 * threads at once with one db (--threads): it answers {"nome": name} with
 * {"idade": integer, "cidade": string} of the person whose busca_key equals
 * that of name, so "João", "JOAO" and " joao " find the same person. Fails
 * with bad_request if nome is missing, not a string, blank or too long;
 * not_found if nobody has that name; internal on a database error. arg is
 * the busca_db * from busca_open, borrowed; the handle is used without
 * locking, so one thread at a time. request is borrowed; the result is a
 * new reference owned by the caller.
 */
json_t *busca_handle(json_t *request, mqrpc_fault *fault, void *arg);

/*
 * busca_key writes to out (outlen bytes, NUL-terminated) the form of name
 * used for matching: surrounding ASCII whitespace removed, ASCII letters
 * lowercased, and the Latin-1 letters U+00C0-U+00FF folded to ASCII
 * ("Conceição" -> "conceicao", "Æ" -> "ae", "Ø" -> "o"); everything else is
 * copied unchanged. The key is never longer than the trimmed name. Returns
 * 0, or -1 if name is not valid UTF-8 or out is too small (out is then
 * unspecified but NUL-terminated when outlen > 0).
 */
int busca_key(const char *name, char *out, size_t outlen);

#endif /* SVC_BUSCA_H */
