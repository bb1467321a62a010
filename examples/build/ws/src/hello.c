#include <stdio.h>

int main(void) {
    printf("hello from a sandboxed build\n");
    return 0;
}
